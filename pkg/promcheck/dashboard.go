package promcheck

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
)

// DatasourceVariable is how every panel of minicloud's dashboards names its
// Prometheus data source: a dashboard variable, so the dashboard imports
// into any Grafana whatever its data source is called.
const DatasourceVariable = "${datasource}"

// Query is one PromQL target of a dashboard panel.
type Query struct {
	Panel string
	RefID string
	Expr  string
}

func (q Query) String() string { return fmt.Sprintf("panel %q, query %s", q.Panel, q.RefID) }

// dashboard is the part of Grafana's dashboard JSON model the checks read.
type dashboard struct {
	Title         string  `json:"title"`
	SchemaVersion int     `json:"schemaVersion"`
	Panels        []panel `json:"panels"`
	Templating    struct {
		List []struct {
			Name  string `json:"name"`
			Type  string `json:"type"`
			Query any    `json:"query"`
		} `json:"list"`
	} `json:"templating"`
}

type panel struct {
	Title      string      `json:"title"`
	Type       string      `json:"type"`
	Datasource *datasource `json:"datasource"`
	Targets    []struct {
		RefID      string      `json:"refId"`
		Expr       string      `json:"expr"`
		Datasource *datasource `json:"datasource"`
	} `json:"targets"`
	// Panels are a collapsed row's.
	Panels []panel `json:"panels"`
}

type datasource struct {
	Type string `json:"type"`
	UID  string `json:"uid"`
}

// DashboardQueries reads a Grafana dashboard (JSON model) and returns the
// PromQL of every panel's targets. Beyond what Grafana itself requires, it
// holds the dashboard to minicloud's rules: a schema version, a
// "datasource" variable of type datasource for Prometheus, and every panel
// and target on DatasourceVariable with an expression.
func DashboardQueries(r io.Reader) ([]Query, error) {
	var d dashboard
	dec := json.NewDecoder(r)
	if err := dec.Decode(&d); err != nil {
		return nil, fmt.Errorf("dashboard JSON: %w", err)
	}
	var errs []error
	if d.Title == "" || d.SchemaVersion == 0 {
		errs = append(errs, errors.New("dashboard has no title or schemaVersion"))
	}
	hasVar := false
	for _, v := range d.Templating.List {
		hasVar = hasVar || (v.Name == "datasource" && v.Type == "datasource" && v.Query == "prometheus")
	}
	if !hasVar {
		errs = append(errs, errors.New(`dashboard has no "datasource" variable of type datasource for prometheus`))
	}
	var out []Query
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			walk(p.Panels)
			if p.Type == "row" {
				continue
			}
			if p.Datasource == nil || p.Datasource.UID != DatasourceVariable {
				errs = append(errs, fmt.Errorf("panel %q: datasource must be %s", p.Title, DatasourceVariable))
			}
			if len(p.Targets) == 0 {
				errs = append(errs, fmt.Errorf("panel %q has no queries", p.Title))
			}
			for _, t := range p.Targets {
				q := Query{Panel: p.Title, RefID: t.RefID, Expr: t.Expr}
				if t.Expr == "" {
					errs = append(errs, fmt.Errorf("%s: no expr", q))
				}
				if t.Datasource != nil && t.Datasource.UID != DatasourceVariable {
					errs = append(errs, fmt.Errorf("%s: datasource must be %s", q, DatasourceVariable))
				}
				out = append(out, q)
			}
		}
	}
	walk(d.Panels)
	return out, errors.Join(errs...)
}

// CheckDashboard checks every query of a dashboard against the exposition
// and returns the problems found, each naming its panel.
func (e *Exposition) CheckDashboard(r io.Reader) error {
	queries, err := DashboardQueries(r)
	errs := []error{err}
	for _, q := range queries {
		if err := e.CheckQuery(q.Expr); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", q, err))
		}
	}
	return errors.Join(errs...)
}
