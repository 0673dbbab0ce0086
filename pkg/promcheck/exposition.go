// Package promcheck knows what Prometheus scrapes of minicloud's daemons
// exposed — every metric family, its type, help and label names — and
// checks PromQL queries (a Grafana dashboard's) against it: a query that
// selects a series no daemon exposes, or matches, groups or joins on a
// label those series do not carry, is an error. Queries are parsed with
// Prometheus' own PromQL parser, so what passes here parses in Prometheus.
//
// The expositions are scrapes of real daemons (see the package's test), so
// a renamed metric or a dropped label fails the check of the dashboard
// that still uses it, and the table of docs/operations.md (MarkdownTable)
// is generated from what the daemons actually serve.
package promcheck

import (
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"

	dto "github.com/prometheus/client_model/go"
	"github.com/prometheus/common/expfmt"
	"github.com/prometheus/common/model"
)

// TargetLabels are the labels Prometheus attaches to every series it
// scrapes: queries may match and group on them whatever the daemon
// exposes.
var TargetLabels = []string{"instance", "job"}

// Family is one metric family as the scrapes exposed it.
type Family struct {
	Name string
	// Type is counter, gauge, histogram, summary or untyped.
	Type string
	Help string
	// Labels are the label names of its series (sorted; a histogram's le
	// and a summary's quantile are not included).
	Labels []string
	// Sources are the scrapes that exposed it (sorted), e.g. api, agent.
	Sources []string
}

// Exposition is what one or more scrapes exposed. The zero value is empty
// and ready to use.
type Exposition struct {
	families map[string]*Family
	// series maps every series name a query can select (a histogram's
	// _bucket, _sum and _count, ...) to its label names.
	series map[string]map[string]bool
}

// Add parses a scrape in the Prometheus text format and adds its families
// under source (the daemon's name). A family exposed by two sources with a
// different type or help is an error: it would be two metrics under one
// name.
func (e *Exposition) Add(source string, r io.Reader) error {
	parser := expfmt.NewTextParser(model.UTF8Validation)
	mfs, err := parser.TextToMetricFamilies(r)
	if err != nil {
		return fmt.Errorf("parse %s metrics: %w", source, err)
	}
	if e.families == nil {
		e.families, e.series = map[string]*Family{}, map[string]map[string]bool{}
	}
	for name, mf := range mfs {
		typ := strings.ToLower(mf.GetType().String())
		labels := map[string]bool{}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = true
			}
		}
		f := e.families[name]
		if f == nil {
			f = &Family{Name: name, Type: typ, Help: mf.GetHelp()}
			e.families[name] = f
		} else if f.Type != typ || f.Help != mf.GetHelp() {
			return fmt.Errorf("%s exposes %s as a %s (%q), %s as a %s (%q)",
				source, name, typ, mf.GetHelp(), strings.Join(f.Sources, ", "), f.Type, f.Help)
		}
		f.Labels = sortedUnion(f.Labels, labels)
		if !slices.Contains(f.Sources, source) {
			f.Sources = append(f.Sources, source)
			slices.Sort(f.Sources)
		}
		for series, extra := range seriesNames(name, mf.GetType()) {
			set := e.series[series]
			if set == nil {
				set = map[string]bool{}
				e.series[series] = set
			}
			maps.Copy(set, labels)
			if extra != "" {
				set[extra] = true
			}
		}
	}
	return nil
}

// seriesNames are the names a family's samples carry, each with the label
// that name adds ("" for none).
func seriesNames(name string, typ dto.MetricType) map[string]string {
	switch typ {
	case dto.MetricType_HISTOGRAM, dto.MetricType_GAUGE_HISTOGRAM:
		return map[string]string{name + "_bucket": "le", name + "_sum": "", name + "_count": ""}
	case dto.MetricType_SUMMARY:
		return map[string]string{name: "quantile", name + "_sum": "", name + "_count": ""}
	default:
		return map[string]string{name: ""}
	}
}

func sortedUnion(have []string, add map[string]bool) []string {
	set := map[string]bool{}
	for _, l := range have {
		set[l] = true
	}
	maps.Copy(set, add)
	return slices.Sorted(maps.Keys(set))
}

// Families returns every family, sorted by name.
func (e *Exposition) Families() []Family {
	out := make([]Family, 0, len(e.families))
	for _, name := range slices.Sorted(maps.Keys(e.families)) {
		out = append(out, *e.families[name])
	}
	return out
}

// seriesLabels returns the labels a query may find on series name (the
// target labels included), and whether any scrape exposed it.
func (e *Exposition) seriesLabels(name string) (map[string]bool, bool) {
	set, ok := e.series[name]
	if !ok {
		return nil, false
	}
	out := maps.Clone(set)
	for _, l := range TargetLabels {
		out[l] = true
	}
	return out, true
}

// MarkdownTable renders the families whose names start with prefix as the
// table docs/operations.md carries between its "metrics table" markers.
func (e *Exposition) MarkdownTable(prefix string) string {
	var b strings.Builder
	b.WriteString("| metric | type | labels | served by | help |\n|---|---|---|---|---|\n")
	for _, f := range e.Families() {
		if !strings.HasPrefix(f.Name, prefix) {
			continue
		}
		labels := make([]string, len(f.Labels))
		for i, l := range f.Labels {
			labels[i] = "`" + l + "`"
		}
		help := strings.ReplaceAll(f.Help, "|", `\|`)
		fmt.Fprintf(&b, "| `%s` | %s | %s | %s | %s |\n", f.Name, f.Type, strings.Join(labels, ", "), strings.Join(f.Sources, ", "), help)
	}
	return b.String()
}
