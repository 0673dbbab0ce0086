package promcheck

import (
	"strings"
	"testing"
)

// Two scrapes in the text format, as client_golang writes them (the real
// daemons' are checked in e2e_test.go).
const apiScrape = `# HELP minicloud_api_requests_total API calls by method and gRPC code.
# TYPE minicloud_api_requests_total counter
minicloud_api_requests_total{code="OK",method="/minicloud.v1.VMService/ListVMs"} 3
# HELP minicloud_api_request_duration_seconds API call latency by method.
# TYPE minicloud_api_request_duration_seconds histogram
minicloud_api_request_duration_seconds_bucket{method="/minicloud.v1.VMService/ListVMs",le="0.001"} 2
minicloud_api_request_duration_seconds_bucket{method="/minicloud.v1.VMService/ListVMs",le="+Inf"} 3
minicloud_api_request_duration_seconds_sum{method="/minicloud.v1.VMService/ListVMs"} 0.01
minicloud_api_request_duration_seconds_count{method="/minicloud.v1.VMService/ListVMs"} 3
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 42
`

const agentScrape = `# HELP minicloud_agent_info Always 1.
# TYPE minicloud_agent_info gauge
minicloud_agent_info{host="h1",hypervisor="kvm",version="v1"} 1
# HELP minicloud_agent_api_contact_age_seconds Seconds since contact.
# TYPE minicloud_agent_api_contact_age_seconds gauge
minicloud_agent_api_contact_age_seconds 2
# HELP go_goroutines Number of goroutines that currently exist.
# TYPE go_goroutines gauge
go_goroutines 17
`

func fixture(t *testing.T) *Exposition {
	t.Helper()
	var e Exposition
	if err := e.Add("api", strings.NewReader(apiScrape)); err != nil {
		t.Fatal(err)
	}
	if err := e.Add("agent", strings.NewReader(agentScrape)); err != nil {
		t.Fatal(err)
	}
	return &e
}

func TestGoodQueriesPass(t *testing.T) {
	e := fixture(t)
	for _, q := range []string{
		`sum by (code) (rate(minicloud_api_requests_total[$__rate_interval]))`,
		`histogram_quantile(0.99, sum by (le, method) (rate(minicloud_api_request_duration_seconds_bucket{method!~".*/Watch.*"}[5m])))`,
		`sum(rate(minicloud_api_request_duration_seconds_sum[${__rate_interval}])) / sum(rate(minicloud_api_request_duration_seconds_count[5m]))`,
		`max by (host) (minicloud_agent_api_contact_age_seconds * on (instance) group_left (host) minicloud_agent_info)`,
		`label_replace(minicloud_agent_info, "kind", "$1", "hypervisor", "(.*)")`,
		`sum by (job) (go_goroutines{instance=~".+"})`,
		`{__name__="go_goroutines"}`,
		`topk(3, sum without (code) (rate(minicloud_api_requests_total[5m])))`,
	} {
		if err := e.CheckQuery(q); err != nil {
			t.Errorf("%s: %v", q, err)
		}
	}
}

// TestBadQueriesFail: each mistake a dashboard can make against the
// daemons is reported, with the name it got wrong.
func TestBadQueriesFail(t *testing.T) {
	e := fixture(t)
	for _, tc := range []struct{ query, want string }{
		{`rate(minicloud_api_request_total[5m])`, "no scraped daemon exposes minicloud_api_request_total"},
		{`minicloud_api_request_duration_seconds`, "no scraped daemon exposes minicloud_api_request_duration_seconds"},
		{`rate(minicloud_api_requests_total{status="OK"}[5m])`, `has no label "status"`},
		{`minicloud_agent_info{le="1"}`, `has no label "le"`},
		{`sum by (host) (rate(minicloud_api_requests_total[5m]))`, `label "host" grouped by`},
		{`histogram_quantile(0.99, sum by (method) (rate(minicloud_api_request_duration_seconds_bucket[5m])))`, `label "le" needed by histogram_quantile`},
		{`sum by (le) (histogram_quantile(0.9, rate(minicloud_api_request_duration_seconds_bucket[5m])))`, `label "le" grouped by`},
		{`minicloud_agent_api_contact_age_seconds * on (host) minicloud_agent_info`, `label "host" matched on (left side)`},
		{`minicloud_agent_api_contact_age_seconds * on (instance) group_left (zone) minicloud_agent_info`, `label "zone" copied by group_left`},
		{`label_replace(minicloud_agent_info, "x", "$1", "zone", "(.*)")`, `label "zone" read by label_replace`},
		{`{__name__=~"minicloud_.*"}`, "select series by their metric name"},
		{`sum(rate(minicloud_api_requests_total[5m])`, "parse:"},
	} {
		err := e.CheckQuery(tc.query)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: error %v, want one containing %q", tc.query, err, tc.want)
		}
	}
}

func TestFamiliesAndTable(t *testing.T) {
	e := fixture(t)
	var names []string
	for _, f := range e.Families() {
		names = append(names, f.Name+"/"+f.Type+"/"+strings.Join(f.Labels, ",")+"/"+strings.Join(f.Sources, ","))
	}
	want := []string{
		"go_goroutines/gauge//agent,api",
		"minicloud_agent_api_contact_age_seconds/gauge//agent",
		"minicloud_agent_info/gauge/host,hypervisor,version/agent",
		"minicloud_api_request_duration_seconds/histogram/method/api",
		"minicloud_api_requests_total/counter/code,method/api",
	}
	if strings.Join(names, " ") != strings.Join(want, " ") {
		t.Fatalf("families\n%s\nwant\n%s", strings.Join(names, "\n"), strings.Join(want, "\n"))
	}
	table := e.MarkdownTable("minicloud_")
	if strings.Contains(table, "go_goroutines") || !strings.Contains(table, "| `minicloud_agent_info` | gauge | `host`, `hypervisor`, `version` | agent | Always 1. |") {
		t.Fatalf("table:\n%s", table)
	}

	// One name, two meanings: refused.
	clash := "# HELP go_goroutines Something else.\n# TYPE go_goroutines counter\ngo_goroutines 1\n"
	if err := e.Add("scheduler", strings.NewReader(clash)); err == nil || !strings.Contains(err.Error(), "go_goroutines") {
		t.Fatalf("a family exposed with another type: %v", err)
	}
}

func TestDashboardRules(t *testing.T) {
	e := fixture(t)
	good := `{"title": "t", "schemaVersion": 39,
	  "templating": {"list": [{"name": "datasource", "type": "datasource", "query": "prometheus"}]},
	  "panels": [
	    {"type": "row", "title": "API", "panels": [
	      {"type": "timeseries", "title": "rate", "datasource": {"type": "prometheus", "uid": "${datasource}"},
	       "targets": [{"refId": "A", "expr": "sum(rate(minicloud_api_requests_total[$__rate_interval]))"}]}]},
	    {"type": "stat", "title": "agents", "datasource": {"type": "prometheus", "uid": "${datasource}"},
	     "targets": [{"refId": "A", "expr": "count(minicloud_agent_info)"}]}]}`
	if err := e.CheckDashboard(strings.NewReader(good)); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ from, to, want string }{
		{"minicloud_api_requests_total[", "minicloud_api_calls_total[", `panel "rate", query A: minicloud_api_calls_total: no scraped daemon exposes minicloud_api_calls_total`},
		{"${datasource}", "prom-1", `panel "rate": datasource must be ${datasource}`},
		{`"expr": "count(minicloud_agent_info)"`, `"expr": ""`, `panel "agents", query A: no expr`},
		{`"name": "datasource"`, `"name": "ds"`, `no "datasource" variable`},
	} {
		err := e.CheckDashboard(strings.NewReader(strings.Replace(good, tc.from, tc.to, 1)))
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s -> %s: %v\nwant %q", tc.from, tc.to, err, tc.want)
		}
	}
}
