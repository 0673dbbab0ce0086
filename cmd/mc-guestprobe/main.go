// Command mc-guestprobe runs inside the tiny test guest (hack/images/build-tiny.sh).
// It reads the instance's metadata from the metadata service and/or a config
// drive and prints it on stdout (the serial console) between marker lines
// that tests and `minicloud vm console-log` look for:
//
//	MINICLOUD-METADATA-BEGIN source=http://169.254.169.254
//	instance-id: ...
//	MINICLOUD-METADATA-END
//	MINICLOUD-GUEST-READY instance-id=<id> hostname=<h> local-ipv4=<ip> source=<src>
//
// When the GCE attribute mc-watch names another attribute, it then follows
// that attribute with GCE's wait_for_change long-poll for good, printing one
// line per answer (changed=false when the poll timed out unchanged), and
// asking again with the same ETag when the service is unreachable:
//
//	MINICLOUD-WATCH key=<k> changed=<bool> etag=<etag> value=<quoted>
//	MINICLOUD-WATCH-ERROR <error>
//
// Attributes mc-listen, mc-ping and mc-tcp make it run network checks and
// print their results (checks.go).
//
// It exists because Debian's busybox-static wget crashes, and it must be a
// static binary (CGO_ENABLED=0): the initramfs has no libc.
package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// maxBody bounds what one metadata answer may print: the guest trusts the
// host, but a console flooded with megabytes helps no one.
const maxBody = 64 << 10

func main() {
	base := flag.String("url", "http://169.254.169.254", "metadata service base URL")
	configDrive := flag.String("config-drive", "", "mounted config drive to print instead of querying the metadata service")
	attempts := flag.Int("attempts", 30, "attempts per metadata request")
	interval := flag.Duration("interval", time.Second, "delay between attempts")
	flag.Parse()

	if *configDrive != "" {
		if err := printConfigDrive(os.Stdout, *configDrive); err != nil {
			fmt.Printf("MINICLOUD-CONFIGDRIVE-ERROR %v\n", err)
			os.Exit(1)
		}
		return
	}
	c := &client{base: strings.TrimRight(*base, "/"), attempts: *attempts, interval: *interval,
		http: &http.Client{Timeout: 5 * time.Second}}
	if err := c.run(context.Background(), os.Stdout); err != nil {
		fmt.Printf("MINICLOUD-GUEST-ERROR %v\n", err)
		os.Exit(1)
	}
	out := &lines{w: os.Stdout}
	serving, checked := c.startChecks(context.Background(), out, c.hostname)
	if err := c.watch(context.Background(), out); err != nil {
		out.printf("MINICLOUD-WATCH-ERROR %v\n", err)
		os.Exit(1)
	}
	<-checked
	if serving {
		select {} // the listener serves until power-off
	}
}

type client struct {
	base     string
	attempts int
	interval time.Duration
	http     *http.Client
	// hostname is the metadata's, once run has read it.
	hostname string
	// token is an IMDSv2 session token, when the service hands one out; a
	// VM with metadata_tokens_required gets 401 without it.
	token string
}

func (c *client) run(ctx context.Context, w io.Writer) error {
	c.fetchToken(ctx)
	fields := []string{"instance-id", "hostname", "local-ipv4"}
	values := map[string]string{}
	var out bytes.Buffer
	for _, f := range fields {
		b, err := c.get(ctx, "/latest/meta-data/"+f)
		if err != nil {
			return err
		}
		values[f] = strings.TrimSpace(string(b))
		fmt.Fprintf(&out, "%s: %s\n", f, values[f])
	}
	// user-data and the OpenStack document are optional: 404 means "none".
	if b, err := c.get(ctx, "/latest/user-data"); err == nil {
		fmt.Fprintf(&out, "user-data:\n%s\n", b)
	} else {
		fmt.Fprintf(&out, "user-data: <%v>\n", err)
	}
	if b, err := c.get(ctx, "/openstack/latest/meta_data.json"); err == nil {
		fmt.Fprintf(&out, "meta_data.json: %s\n", compactJSON(b))
	} else {
		fmt.Fprintf(&out, "meta_data.json: <%v>\n", err)
	}
	c.hostname = values["hostname"]
	fmt.Fprintf(w, "MINICLOUD-METADATA-BEGIN source=%s\n%sMINICLOUD-METADATA-END\n", c.base, out.String())
	fmt.Fprintf(w, "MINICLOUD-GUEST-READY instance-id=%s hostname=%s local-ipv4=%s source=metadata\n",
		values["instance-id"], values["hostname"], values["local-ipv4"])
	return nil
}

// fetchToken asks for an IMDSv2 token once; a service without tokens answers
// 404/405 and the probe goes on without one.
func (c *client) fetchToken(ctx context.Context) {
	for i := 0; i < c.attempts; i++ {
		req, _ := http.NewRequestWithContext(ctx, http.MethodPut, c.base+"/latest/api/token", nil)
		req.Header.Set("X-aws-ec2-metadata-token-ttl-seconds", "21600")
		resp, err := c.http.Do(req)
		if err != nil {
			time.Sleep(c.interval)
			continue
		}
		b, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			c.token = strings.TrimSpace(string(b))
		}
		return
	}
}

var errNotFound = errors.New("not found")

func (c *client) get(ctx context.Context, path string) ([]byte, error) {
	var last error
	for i := 0; i < c.attempts; i++ {
		if i > 0 {
			time.Sleep(c.interval)
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
		if err != nil {
			return nil, err
		}
		if c.token != "" {
			req.Header.Set("X-aws-ec2-metadata-token", c.token)
		}
		resp, err := c.http.Do(req)
		if err != nil {
			last = fmt.Errorf("GET %s: %w", path, err)
			continue
		}
		b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
		resp.Body.Close()
		switch {
		case err != nil:
			last = fmt.Errorf("GET %s: %w", path, err)
		case resp.StatusCode == http.StatusNotFound:
			return nil, errNotFound
		case resp.StatusCode != http.StatusOK:
			last = fmt.Errorf("GET %s: %s", path, resp.Status)
		default:
			return b, nil
		}
	}
	return nil, last
}

// printConfigDrive prints an OpenStack (config-2) or NoCloud (cidata) drive.
func printConfigDrive(w io.Writer, dir string) error {
	var out bytes.Buffer
	id := ""
	if b, err := readLimited(filepath.Join(dir, "openstack/latest/meta_data.json")); err == nil {
		fmt.Fprintf(&out, "meta_data.json: %s\n", compactJSON(b))
		var md struct {
			UUID string `json:"uuid"`
		}
		if json.Unmarshal(b, &md) == nil {
			id = md.UUID
		}
		if ud, err := readLimited(filepath.Join(dir, "openstack/latest/user_data")); err == nil {
			fmt.Fprintf(&out, "user-data:\n%s\n", ud)
		}
	} else if b, err := readLimited(filepath.Join(dir, "meta-data")); err == nil {
		fmt.Fprintf(&out, "meta-data:\n%s\n", b)
		for _, l := range strings.Split(string(b), "\n") {
			if k, v, ok := strings.Cut(l, ":"); ok && strings.TrimSpace(k) == "instance-id" {
				id = strings.Trim(strings.TrimSpace(v), `"'`)
			}
		}
		if ud, err := readLimited(filepath.Join(dir, "user-data")); err == nil {
			fmt.Fprintf(&out, "user-data:\n%s\n", ud)
		}
	} else {
		return fmt.Errorf("no openstack/latest/meta_data.json or meta-data in %s", dir)
	}
	fmt.Fprintf(w, "MINICLOUD-CONFIGDRIVE-BEGIN\n%sMINICLOUD-CONFIGDRIVE-END\n", out.String())
	fmt.Fprintf(w, "MINICLOUD-CONFIGDRIVE-READY instance-id=%s\n", id)
	return nil
}

func readLimited(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	return io.ReadAll(io.LimitReader(f, maxBody))
}

func compactJSON(b []byte) string {
	var buf bytes.Buffer
	if json.Compact(&buf, b) != nil {
		return strings.TrimSpace(string(b))
	}
	return buf.String()
}

const gceAttributes = "/computeMetadata/v1/instance/attributes/"

// gceGet is one GCE request: body, ETag and status code.
func (c *client) gceGet(ctx context.Context, hc *http.Client, path string) ([]byte, string, int, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, c.base+path, nil)
	if err != nil {
		return nil, "", 0, err
	}
	req.Header.Set("Metadata-Flavor", "Google")
	resp, err := hc.Do(req)
	if err != nil {
		return nil, "", 0, fmt.Errorf("GET %s: %w", path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, "", 0, fmt.Errorf("GET %s: %w", path, err)
	}
	return b, resp.Header.Get("ETag"), resp.StatusCode, nil
}

// watch follows the attribute named by the mc-watch attribute, if there is
// one, until the process ends. Each answer is printed, so a test reads on
// the console when the guest saw a change and that an unchanged poll held
// until its timeout.
func (c *client) watch(ctx context.Context, w io.Writer) error {
	name, _, code, err := c.gceGet(ctx, c.http, gceAttributes+"mc-watch")
	if err != nil || code != http.StatusOK {
		return nil // no watch asked for (or no GCE tree)
	}
	key := strings.TrimSpace(string(name))
	timeout := "30"
	if t, _, code, err := c.gceGet(ctx, c.http, gceAttributes+"mc-watch-timeout"); err == nil && code == http.StatusOK {
		timeout = strings.TrimSpace(string(t))
	}
	long := &http.Client{Timeout: 10 * time.Minute}
	value, etag, code, err := c.gceGet(ctx, long, gceAttributes+key)
	if err != nil {
		return err
	}
	if code != http.StatusOK {
		return fmt.Errorf("attribute %s: HTTP %d", key, code)
	}
	fmt.Fprintf(w, "MINICLOUD-WATCH key=%s changed=false etag=%s value=%q\n", key, etag, value)
	for {
		v, e, code, err := c.gceGet(ctx, long, gceAttributes+key+"?wait_for_change=true&timeout_sec="+timeout+"&last_etag="+etag)
		if err != nil {
			// The service restarts with its host's agent: keep the ETag
			// and ask again, as GCE's guest agent does.
			fmt.Fprintf(w, "MINICLOUD-WATCH-ERROR %v\n", err)
			time.Sleep(c.interval)
			continue
		}
		if code != http.StatusOK {
			// The attribute went away: say so, and wait for it to return.
			fmt.Fprintf(w, "MINICLOUD-WATCH key=%s changed=true etag= value=<HTTP %d>\n", key, code)
			time.Sleep(c.interval)
			etag = ""
			continue
		}
		fmt.Fprintf(w, "MINICLOUD-WATCH key=%s changed=%t etag=%s value=%q\n", key, e != etag, e, v)
		etag = e
	}
}
