package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/timestamppb"
	"sigs.k8s.io/yaml"
)

// outputFormat is the value of -o.
type outputFormat string

const (
	formatTable outputFormat = "table"
	formatJSON  outputFormat = "json"
	formatYAML  outputFormat = "yaml"
)

func (f *outputFormat) String() string { return string(*f) }
func (f *outputFormat) Type() string   { return "table|json|yaml" }
func (f *outputFormat) Set(s string) error {
	switch outputFormat(s) {
	case formatTable, formatJSON, formatYAML:
		*f = outputFormat(s)
		return nil
	}
	return fmt.Errorf("output format %q: must be table, json or yaml", s)
}

// addOutputFlag adds -o/--output to cmd.
func addOutputFlag(cmd *cobra.Command) *outputFormat {
	f := formatTable
	cmd.Flags().VarP(&f, "output", "o", "output format: table, json (protojson of the message) or yaml")
	cmd.RegisterFlagCompletionFunc("output", cobra.FixedCompletions([]string{"table", "json", "yaml"}, cobra.ShellCompDirectiveNoFileComp))
	return &f
}

// printMessage writes msg as JSON or YAML, or calls table for the table
// format.
func printMessage(w io.Writer, f outputFormat, msg proto.Message, table func(io.Writer) error) error {
	switch f {
	case formatJSON:
		b, err := marshalJSON(msg)
		if err != nil {
			return err
		}
		_, err = w.Write(b)
		return err
	case formatYAML:
		b, err := marshalJSON(msg)
		if err != nil {
			return err
		}
		y, err := yaml.JSONToYAML(b)
		if err != nil {
			return fmt.Errorf("convert to yaml: %w", err)
		}
		_, err = w.Write(y)
		return err
	}
	return table(w)
}

// marshalJSON is protojson, re-indented with encoding/json because
// protojson deliberately varies its whitespace between builds.
func marshalJSON(msg proto.Message) ([]byte, error) {
	raw, err := protojson.Marshal(msg)
	if err != nil {
		return nil, fmt.Errorf("encode json: %w", err)
	}
	var buf bytes.Buffer
	if err := json.Indent(&buf, raw, "", "  "); err != nil {
		return nil, fmt.Errorf("indent json: %w", err)
	}
	buf.WriteByte('\n')
	return buf.Bytes(), nil
}

// writeTable writes aligned columns.
func writeTable(w io.Writer, header []string, rows [][]string) error {
	tw := tabwriter.NewWriter(w, 0, 8, 3, ' ', 0)
	fmt.Fprintln(tw, strings.Join(header, "\t"))
	for _, r := range rows {
		fmt.Fprintln(tw, strings.Join(r, "\t"))
	}
	return tw.Flush()
}

// field is one line of a detail view.
type field struct{ key, value string }

// writeFields writes "Key:  value" lines, aligned.
func writeFields(w io.Writer, fields []field) error {
	tw := tabwriter.NewWriter(w, 0, 8, 2, ' ', 0)
	for _, f := range fields {
		fmt.Fprintf(tw, "%s:\t%s\n", f.key, f.value)
	}
	return tw.Flush()
}

// now is replaced by tests.
var now = time.Now

// age renders the time since t like kubectl does: 45s, 12m, 5h, 3d.
func age(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	d := now().Sub(t.AsTime())
	switch {
	case d < 0:
		return "0s"
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}

func timestamp(t *timestamppb.Timestamp) string {
	if t == nil {
		return "-"
	}
	return t.AsTime().UTC().Format(time.RFC3339)
}

// bytesIEC renders a size as 1.5 GiB, 200 MiB, 512 B.
func bytesIEC(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit && exp < 5; m /= unit {
		div *= unit
		exp++
	}
	v := float64(n) / float64(div)
	if v == float64(int64(v)) {
		return fmt.Sprintf("%d %ciB", int64(v), "KMGTPE"[exp])
	}
	return fmt.Sprintf("%.1f %ciB", v, "KMGTPE"[exp])
}

// enumName turns VM_PHASE_RUNNING into RUNNING given the prefix VM_PHASE_.
func enumName(s, prefix string) string {
	s = strings.TrimPrefix(s, prefix)
	if s == "UNSPECIFIED" {
		return "-"
	}
	return s
}

// orDash shows "-" for empty cells so columns stay aligned for awk.
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
