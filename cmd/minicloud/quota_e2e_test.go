package main

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestE2EQuotas: the daemon's default quota (its --default-quota-* flags),
// `quota set` overrides, `quota show` with usage, refusals with what was
// asked, used and allowed, and image visibility across projects.
func TestE2EQuotas(t *testing.T) {
	t.Parallel()     // an API of its own (own etcd, ports, dirs), nothing on the host
	c := startAPI(t) // VMs here must not boot
	dir := c.seed()  // network default, flavor tiny, image tiny (private to default)

	var q struct {
		Project string
		Limits  struct{ Instances, Networks, ImageBytes string }
		Usage   struct{ Networks, ImageBytes string }
	}
	decodeJSON(t, c.ok("quota", "show", "-o", "json"), &q)
	if q.Project != "default" || q.Limits.Instances != "20" || q.Limits.Networks != "10" || q.Usage.Networks != "1" || q.Usage.ImageBytes != "1048576" {
		t.Fatalf("quota show -o json: %+v", q)
	}
	c.ok("quota", "set", "default", "--instances", "1", "--networks", "1")
	table := c.ok("quota", "show", "default")
	if !strings.Contains(table, "RESOURCE") || !strings.Contains(strings.Join(strings.Fields(table), " "), "instances 0 1 project") {
		t.Fatalf("quota show:\n%s", table)
	}
	c.ok("vm", "create", "a", "--image", "tiny", "--flavor", "tiny")
	c.fails(exitGeneric, "instances: asked 1, used 1, allowed 1", "vm", "create", "b", "--image", "tiny", "--flavor", "tiny")
	c.fails(exitGeneric, "networks: asked 1, used 1, allowed 1", "network", "create", "n2", "--cidr", "10.98.0.0/24")
	c.ok("vm", "delete", "a")
	c.ok("vm", "create", "b", "--image", "tiny", "--flavor", "tiny")
	c.ok("quota", "set", "default", "--reset")
	decodeJSON(t, c.ok("quota", "show", "-o", "json"), &q)
	if q.Limits.Instances != "20" {
		t.Fatalf("after --reset: %+v", q)
	}
	c.fails(exitUsage, "give at least one limit", "quota", "set", "default")

	// Images: private to their project unless made public.
	c.ok("project", "create", "other")
	c.fails(exitNotFound, "tiny", "--project", "other", "image", "show", "tiny")
	c.ok("--project", "other", "network", "create", "default", "--cidr", "10.97.0.0/24")
	c.fails(exitNotFound, "image tiny not found", "--project", "other", "vm", "create", "x", "--image", "tiny", "--flavor", "tiny")
	c.ok("image", "set-visibility", "tiny", "public")
	c.ok("--project", "other", "vm", "create", "x", "--image", "tiny", "--flavor", "tiny")
	if out := c.ok("--project", "other", "image", "list"); !strings.Contains(out, "public") {
		t.Fatalf("image list in project other:\n%s", out)
	}
	c.ok("--project", "other", "quota", "set", "other", "--image-bytes", "1000")
	c.fails(exitGeneric, "image_bytes: asked", "--project", "other", "image", "create", "big", "--file", filepath.Join(dir, "disk.img"))
}
