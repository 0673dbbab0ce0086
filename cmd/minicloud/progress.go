package main

import (
	"fmt"
	"io"
	"strings"
	"time"
)

// progress reports an upload on stderr: a bar redrawn in place on a
// terminal, otherwise a single line at the end (logs stay readable).
type progress struct {
	w        io.Writer
	terminal bool
	label    string
	total    int64
	done     int64
	start    time.Time
	drawn    time.Time
}

const barWidth = 30

func newProgress(w io.Writer, terminal bool, label string, total int64) *progress {
	return &progress{w: w, terminal: terminal, label: label, total: total, start: now()}
}

func (p *progress) add(n int) {
	p.done += int64(n)
	if !p.terminal {
		return
	}
	if t := now(); t.Sub(p.drawn) >= 100*time.Millisecond || p.done == p.total {
		p.drawn = t
		fmt.Fprintf(p.w, "\r%s", p.bar())
	}
}

func (p *progress) bar() string {
	frac := 1.0
	if p.total > 0 {
		frac = float64(p.done) / float64(p.total)
	}
	filled := int(frac * barWidth)
	return fmt.Sprintf("%s [%s%s] %3.0f%% %s/%s %s/s ", p.label,
		strings.Repeat("=", filled), strings.Repeat(" ", barWidth-filled),
		frac*100, bytesIEC(p.done), bytesIEC(p.total), bytesIEC(p.rate()))
}

func (p *progress) rate() int64 {
	secs := now().Sub(p.start).Seconds()
	if secs <= 0 {
		return 0
	}
	return int64(float64(p.done) / secs)
}

// finish ends the bar line, or writes the summary line.
func (p *progress) finish() {
	if p.terminal {
		fmt.Fprintf(p.w, "\r%s\n", p.bar())
		return
	}
	fmt.Fprintf(p.w, "%s: uploaded %s in %s (%s/s)\n", p.label, bytesIEC(p.done),
		now().Sub(p.start).Round(time.Millisecond), bytesIEC(p.rate()))
}

// abandon ends a bar that will not finish, so the error that follows
// starts on its own line.
func (p *progress) abandon() {
	if p.terminal && p.done > 0 {
		fmt.Fprintln(p.w)
	}
}
