package promcheck

import (
	"errors"
	"fmt"
	"maps"
	"regexp"
	"slices"
	"strings"

	"github.com/prometheus/prometheus/model/labels"
	"github.com/prometheus/prometheus/promql/parser"
)

// grafanaIntervals are Grafana's built-in interval variables, which
// Grafana replaces before the query reaches Prometheus (and which the
// PromQL parser therefore does not know).
var grafanaIntervals = regexp.MustCompile(`\$\{?__(rate_interval|interval|range)(_ms|_s)?\}?`)

// CheckQuery parses expr (Grafana's interval variables allowed) and checks
// it against the exposition: every series it selects must be exposed, and
// every label it matches on, groups by, joins on or copies must be on the
// series beneath. All the problems found are returned, joined.
func (e *Exposition) CheckQuery(expr string) error {
	q := grafanaIntervals.ReplaceAllString(expr, "5m")
	node, err := parser.NewParser(parser.Options{}).ParseExpr(q)
	if err != nil {
		return fmt.Errorf("parse: %w", err)
	}
	c := checker{e: e}
	c.labels(node)
	return errors.Join(c.errs...)
}

type checker struct {
	e    *Exposition
	errs []error
}

func (c *checker) errorf(format string, args ...any) {
	c.errs = append(c.errs, fmt.Errorf(format, args...))
}

// labels checks node and returns the label names its result may carry.
func (c *checker) labels(node parser.Node) map[string]bool {
	switch n := node.(type) {
	case *parser.VectorSelector:
		return c.selector(n)
	case *parser.MatrixSelector:
		return c.labels(n.VectorSelector)
	case *parser.SubqueryExpr:
		return c.labels(n.Expr)
	case *parser.ParenExpr:
		return c.labels(n.Expr)
	case *parser.UnaryExpr:
		return c.labels(n.Expr)
	case *parser.StepInvariantExpr:
		return c.labels(n.Expr)
	case *parser.NumberLiteral, *parser.StringLiteral, *parser.DurationExpr:
		return map[string]bool{}
	case *parser.AggregateExpr:
		return c.aggregate(n)
	case *parser.BinaryExpr:
		return c.binary(n)
	case *parser.Call:
		return c.call(n)
	default:
		c.errorf("%s: cannot check a %T", node, node)
		return map[string]bool{}
	}
}

func (c *checker) selector(n *parser.VectorSelector) map[string]bool {
	name := n.Name
	for _, m := range n.LabelMatchers {
		if m.Name == labels.MetricName && m.Type == labels.MatchEqual {
			name = m.Value
		}
	}
	if name == "" {
		c.errorf("%s: select series by their metric name, so the check can find them", n)
		return map[string]bool{}
	}
	have, ok := c.e.seriesLabels(name)
	if !ok {
		c.errorf("%s: no scraped daemon exposes %s", n, name)
		return map[string]bool{}
	}
	for _, m := range n.LabelMatchers {
		if m.Name != labels.MetricName && !have[m.Name] {
			c.errorf("%s: %s has no label %q (it has %s)", n, name, m.Name, list(have))
		}
	}
	return have
}

func (c *checker) aggregate(n *parser.AggregateExpr) map[string]bool {
	in := c.labels(n.Expr)
	if n.Param != nil {
		c.labels(n.Param)
	}
	c.require(n, in, n.Grouping, "grouped by")
	out := map[string]bool{}
	switch {
	case n.Op == parser.TOPK || n.Op == parser.BOTTOMK || n.Op == parser.LIMITK || n.Op == parser.LIMIT_RATIO:
		out = maps.Clone(in) // selects series, keeps their labels
	case n.Without:
		out = maps.Clone(in)
		for _, l := range n.Grouping {
			delete(out, l)
		}
	default:
		for _, l := range n.Grouping {
			out[l] = true
		}
	}
	if s, ok := n.Param.(*parser.StringLiteral); ok && n.Op == parser.COUNT_VALUES {
		out[s.Val] = true
	}
	return out
}

func (c *checker) binary(n *parser.BinaryExpr) map[string]bool {
	lhs, rhs := c.labels(n.LHS), c.labels(n.RHS)
	out := maps.Clone(lhs)
	maps.Copy(out, rhs)
	vm := n.VectorMatching
	if vm == nil || n.LHS.Type() != parser.ValueTypeVector || n.RHS.Type() != parser.ValueTypeVector {
		return out
	}
	if vm.On {
		c.require(n, lhs, vm.MatchingLabels, "matched on (left side)")
		c.require(n, rhs, vm.MatchingLabels, "matched on (right side)")
	}
	switch vm.Card {
	case parser.CardManyToOne:
		c.require(n, rhs, vm.Include, "copied by group_left")
	case parser.CardOneToMany:
		c.require(n, lhs, vm.Include, "copied by group_right")
	}
	return out
}

func (c *checker) call(n *parser.Call) map[string]bool {
	// The series a function works on are its first vector or range
	// argument's (histogram_quantile's second, label_replace's first).
	in := map[string]bool{}
	found := false
	for _, arg := range n.Args {
		l := c.labels(arg)
		if !found && (arg.Type() == parser.ValueTypeVector || arg.Type() == parser.ValueTypeMatrix) {
			in, found = l, true
		}
	}
	out := maps.Clone(in)
	switch n.Func.Name {
	case "histogram_quantile":
		// Classic histograms: buckets by le, which the result drops.
		c.require(n, in, []string{"le"}, "needed by histogram_quantile")
		delete(out, "le")
	case "label_replace":
		// label_replace(v, dst, replacement, src, regex)
		if src := stringArg(n, 3); src != "" {
			c.require(n, in, []string{src}, "read by label_replace")
		}
		out[stringArg(n, 1)] = true
	case "label_join":
		// label_join(v, dst, separator, src...)
		for i := 3; i < len(n.Args); i++ {
			c.require(n, in, []string{stringArg(n, i)}, "read by label_join")
		}
		out[stringArg(n, 1)] = true
	}
	return out
}

func stringArg(n *parser.Call, i int) string {
	if i < len(n.Args) {
		if s, ok := n.Args[i].(*parser.StringLiteral); ok {
			return s.Val
		}
	}
	return ""
}

// require reports every label of want missing from have.
func (c *checker) require(n parser.Node, have map[string]bool, want []string, what string) {
	for _, l := range want {
		if !have[l] {
			c.errorf("%s: label %q %s is on none of the series beneath (they have %s)", n, l, what, list(have))
		}
	}
}

func list(set map[string]bool) string {
	if len(set) == 0 {
		return "no labels"
	}
	return strings.Join(slices.Sorted(maps.Keys(set)), ", ")
}
