package server_test

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	clientv3 "go.etcd.io/etcd/client/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/prototext"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	minicloudv1 "github.com/minicloud/minicloud/api/minicloud/v1"
	"github.com/minicloud/minicloud/pkg/store"
)

// TestFuzzEveryRPC is a property test of the whole API surface: random
// requests — filled from each method's own descriptor with a seeded
// generator (huge, unicode and NUL strings, out-of-range numbers and enum
// values, nested and repeated fields) or raw bytes that are not a valid
// encoding at all — are sent to every method of every service the real
// server registers, as the admin, as a host and without credentials, over
// real TLS to a real etcd. For every call:
//
//   - the server does not panic (it runs in this process: a panic fails
//     the test binary);
//   - the answer is OK or a status code that says what was wrong
//     (InvalidArgument, NotFound, ...), never Unknown, Internal or
//     DataLoss — except Internal for a body that is not protobuf at all,
//     which grpc-go itself answers before any minicloud code runs;
//   - a refused call leaves etcd as it found it: every key and value,
//     except audit records (a refused call is audited on purpose,
//     TestAuditLog) and keys whose lease expired meanwhile (host liveness,
//     join tokens, request ids: time, not the call, removed them).
//
// MINICLOUD_FUZZ_CALLS (default 1500) and MINICLOUD_FUZZ_SEED (default 1)
// run longer or other sequences; MINICLOUD_FUZZ_VERBOSE=1 prints each call
// before it is sent, to find the one that crashed the binary.
func TestFuzzEveryRPC(t *testing.T) {
	if testing.Short() {
		t.Skip("fuzz: skipped with -short")
	}
	calls := envInt(t, "MINICLOUD_FUZZ_CALLS", 1500)
	seed := envInt(t, "MINICLOUD_FUZZ_SEED", 1)
	verbose := os.Getenv("MINICLOUD_FUZZ_VERBOSE") == "1"

	e := newEnv(t)
	e.seed()
	e.registerHost("fuzzhost", "127.0.0.1:1")
	f := &fuzzer{
		r: rand.New(rand.NewPCG(uint64(seed), 0x6d696e69)),
		names: []string{"default", "small", "tiny", "debian", "fuzzhost", "admin",
			"10.99.0.0/24", "10.98.0.0/24", "web", "db", "p1", "u1", "fz-sg"},
	}
	f.baseNames = len(f.names)
	conns := []struct {
		who  string
		conn grpc.ClientConnInterface
		w    int // weight
	}{
		{"admin", e.conn, 7},
		{"host fuzzhost", e.hostConn("fuzzhost"), 2},
		{"anonymous", e.userConn(""), 1},
	}

	methods := registeredMethods(t, e)
	if len(methods) < 60 {
		t.Fatalf("only %d methods found on the server", len(methods))
	}
	var failures []string
	seen := map[string]bool{}
	fail := func(key, msg string) {
		if seen[key] {
			return
		}
		seen[key] = true
		failures = append(failures, msg)
	}
	codesSeen := map[codes.Code]int{}
	succeeded := map[string]bool{}
	refused := 0
	for i := range calls {
		if i%reseedEvery == 0 {
			f.reseed(t, e, i/reseedEvery)
		}
		m := methods[f.r.IntN(len(methods))]
		pick := f.r.IntN(10)
		c := conns[0]
		if pick >= 7 {
			c = conns[1]
		}
		if pick == 9 {
			c = conns[2]
		}
		// One call in eight carries bytes that are not a valid encoding of
		// its request.
		var req any
		var desc string
		raw := f.r.IntN(8) == 0
		if raw {
			b := f.malformed(m.in)
			req, desc = &rawBody{b: b}, fmt.Sprintf("%d raw bytes %q", len(b), truncate(string(b), 200))
		} else {
			msg := f.request(t, m)
			req, desc = msg.Interface(), truncate(prototext.Format(msg.Interface()), 600)
		}
		if _, hostCall := hostTemplates[m.short()]; hostCall && f.r.IntN(5) != 0 {
			c = conns[1] // the agent's calls, as the agent makes them
		}
		where := fmt.Sprintf("call #%d (seed %d) %s as %s: %s", i, seed, m.name, c.who, desc)
		if verbose {
			fmt.Fprintln(os.Stderr, where)
		}
		before := dumpWithLeases(t, e)
		err := m.call(c.conn, req, raw)
		code := status.Code(err)
		codesSeen[code]++
		if err == nil {
			succeeded[m.name] = true
			continue
		}
		msg := status.Convert(err).Message()
		if code == codes.Unavailable || code == codes.Aborted {
			// Proper codes, but worth a look: logged once each.
			if k := m.name + code.String() + firstWords(msg); !seen[k] {
				seen[k] = true
				t.Logf("%s → %s: %s", m.name, code, truncate(msg, 300))
			}
		}
		switch code {
		case codes.InvalidArgument, codes.NotFound, codes.AlreadyExists, codes.FailedPrecondition,
			codes.PermissionDenied, codes.Unauthenticated, codes.ResourceExhausted, codes.OutOfRange,
			codes.Aborted, codes.Unimplemented, codes.Unavailable:
		case codes.Internal:
			if raw && strings.Contains(msg, "grpc: failed to unmarshal the received message") {
				break // grpc-go's own answer to a body that is not protobuf
			}
			fail(m.name+code.String()+firstWords(msg), fmt.Sprintf("%s\n  → %s: %s", where, code, msg))
		default:
			fail(m.name+code.String()+firstWords(msg), fmt.Sprintf("%s\n  → %s: %s", where, code, msg))
		}
		refused++
		if diff := storeDiff(t, e, before); diff != "" {
			fail(m.name+"store"+firstWords(msg), fmt.Sprintf("%s\n  → refused (%s: %s) but etcd changed:\n%s", where, code, msg, diff))
		}
	}
	var summary []string
	for c, n := range codesSeen {
		summary = append(summary, fmt.Sprintf("%s=%d", c, n))
	}
	sort.Strings(summary)
	t.Logf("%d calls over %d methods, %d refused; codes: %s", calls, len(methods), refused, strings.Join(summary, " "))
	var never []string
	for _, m := range methods {
		if !succeeded[m.name] {
			never = append(never, m.short())
		}
	}
	t.Logf("methods no random call got through: %v", never)
	if codesSeen[codes.OK] == 0 || refused == 0 {
		t.Errorf("the generator reached no success or no refusal: %v", codesSeen)
	}
	for i, msg := range failures {
		if i == 20 {
			t.Errorf("... and %d more", len(failures)-20)
			break
		}
		t.Error(msg)
	}
}

func envInt(t *testing.T, name string, def int) int {
	v := os.Getenv(name)
	if v == "" {
		return def
	}
	n, err := strconv.Atoi(v)
	if err != nil {
		t.Fatalf("%s=%q: %v", name, v, err)
	}
	return n
}

func truncate(s string, n int) string {
	if len(s) <= n {
		return s
	}
	for n > 0 && !utf8.RuneStart(s[n]) {
		n--
	}
	return s[:n] + fmt.Sprintf("…(%d bytes)", len(s))
}

// firstWords keys failures by the start of their message, so one bug is
// reported once, not once per call that hits it.
func firstWords(s string) string {
	w := strings.Fields(s)
	return strings.Join(w[:min(len(w), 4)], " ")
}

// reseedEvery is how many calls run between two reseeds: successful calls
// delete what the templates name (the VM, the network, the flavor), and
// without them every later call would stop at NotFound.
const reseedEvery = 150

// reseed puts back what the templates need — flavors, the default network,
// the image, the host (with room for every round's VM), and a new VM
// placed on it, which the templates name from now on. Failures are fine
// (the object may still exist, or the fuzzer may have made it impossible:
// a network over the range); they only make the next calls less useful.
func (f *fuzzer) reseed(t *testing.T, e *env, round int) {
	c := ctx(t)
	for _, fl := range []*minicloudv1.CreateFlavorRequest{
		{Name: "small", Vcpus: 1, MemoryMib: 1024, DiskGib: 4},
		{Name: "tiny", Vcpus: 1, MemoryMib: 256, DiskGib: 1},
	} {
		_, _ = e.flv.CreateFlavor(c, fl)
	}
	_, _ = e.nets.CreateNetwork(c, &minicloudv1.CreateNetworkRequest{Name: "default", Cidr: "10.99.0.0/24"})
	e.putImage("debian", 0)
	_, _ = e.hosts.RegisterHost(c, &minicloudv1.RegisterHostRequest{Host: &minicloudv1.Host{
		Meta: &minicloudv1.ObjectMeta{Name: "fuzzhost"}, Address: "127.0.0.1:1",
		Capacity: &minicloudv1.Resources{Vcpus: 1 << 20, MemoryMib: 1 << 40, DiskGib: 1 << 30}, Hypervisors: []string{"tcg"},
	}})
	_, _ = e.hosts.EnableHost(c, &minicloudv1.EnableHostRequest{Name: "fuzzhost"})
	_, _ = minicloudv1.NewQuotaServiceClient(e.conn).SetQuota(c, &minicloudv1.SetQuotaRequest{Project: "default", ResetToDefaults: true})
	name := fmt.Sprintf("vm%d", round)
	vm, err := e.vms.CreateVM(c, &minicloudv1.CreateVMRequest{Name: name, Spec: &minicloudv1.VMSpec{Image: "debian", Flavor: "tiny"}})
	if err != nil {
		t.Logf("reseed %d: create %s: %v", round, name, err)
		return
	}
	if err := e.tryPlace(vm.GetMeta().GetId(), "fuzzhost"); err != nil {
		t.Logf("reseed %d: %v", round, err)
	}
	f.vmName, f.vmID = name, vm.GetMeta().GetId()
	f.names = append(f.names[:f.baseNames:f.baseNames], name, f.vmID)
}

// templates are valid requests (prototext) of the methods whose random
// requests rarely get past validation; the fuzzer sends them with a few
// fields changed, so the code behind the validation is reached too.
var templates = map[string]string{
	"CreateVM":           `name:"fz-vm" spec:{image:"debian" flavor:"tiny" networks:"default" ssh_public_keys:"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGl5Y2hEY9+0XnH8cS4Pn1Mo9h3KxG8nKJ9YVtq9GkR2 a" hostname:"fz" tags:"t" metadata:{key:"k" value:"v"}} user_data:"#!/bin/sh" request_id:"r1" labels:{key:"a" value:"b"}`,
	"DeleteVM":           `name:"vm1"`,
	"StartVM":            `name:"vm1"`,
	"StopVM":             `name:"vm1"`,
	"RebootVM":           `name:"vm1"`,
	"GetVM":              `name:"vm1"`,
	"ListVMEvents":       `name:"vm1"`,
	"GetConsoleLog":      `name:"vm1" tail_bytes:100`,
	"UpdateVMMetadata":   `name:"vm1" set_labels:{key:"a" value:"b"} add_tags:"x" set_metadata:{key:"k" value:"v"} remove_labels:"c"`,
	"ExposeVMPort":       `name:"vm1" forward:{host_port:20080 guest_port:80}`,
	"UnexposeVMPort":     `name:"vm1" host_port:20080`,
	"CreateNetwork":      `name:"fz-net" cidr:"10.98.0.0/24" gateway:"10.98.0.1" mtu:1400 dns_servers:"1.1.1.1"`,
	"GetNetwork":         `name:"default"`,
	"DeleteNetwork":      `name:"default"`,
	"CreateFlavor":       `name:"fz-flavor" vcpus:2 memory_mib:512 disk_gib:2`,
	"DeleteFlavor":       `name:"tiny"`,
	"CreateServerGroup":  `name:"fz-sg" policy:SERVER_GROUP_POLICY_ANTI_AFFINITY`,
	"GetServerGroup":     `name:"fz-sg"`,
	"DeleteServerGroup":  `name:"fz-sg"`,
	"CreateProject":      `name:"p1" description:"d"`,
	"GetProject":         `name:"p1"`,
	"DeleteProject":      `name:"p1"`,
	"CreateUser":         `name:"u1" project:"p1" role:"member" token_ttl_seconds:3600`,
	"GetUser":            `name:"u1"`,
	"DeleteUser":         `name:"u1"`,
	"GrantRole":          `user:"u1" project:"default" role:"reader"`,
	"RevokeRole":         `user:"u1" project:"default"`,
	"CreateToken":        `user:"u1" ttl_seconds:60 description:"d"`,
	"SetQuota":           `project:"default" limits:{instances:5 vcpus:10 memory_mib:4096 disk_gib:50 networks:3}`,
	"GetQuota":           `project:"default"`,
	"GetImage":           `name:"debian"`,
	"DeleteImage":        `name:"debian"`,
	"SetImageVisibility": `name:"debian" visibility:IMAGE_VISIBILITY_PUBLIC`,
	"CreateJoinToken":    `ttl_seconds:600 description:"d"`,
	"GetHost":            `name:"fuzzhost"`,
	"DisableHost":        `name:"fuzzhost" reason:"r"`,
	"EnableHost":         `name:"fuzzhost"`,
	"RevokeHost":         `name:"fuzzhost"`,
}

// hostTemplates are the agent's calls, made as host fuzzhost.
var hostTemplates = map[string]string{
	"RegisterHost":       `host:{meta:{name:"fuzzhost"} address:"127.0.0.1:1" capacity:{vcpus:8 memory_mib:16384 disk_gib:100} hypervisors:"tcg"}`,
	"Heartbeat":          `name:"fuzzhost"`,
	"WatchAssignments":   `host:"fuzzhost"`,
	"WatchNetworkPorts":  `host:"fuzzhost"`,
	"ReportVMStatus":     `host:"fuzzhost" vm_id:"VMID" status:{phase:VM_PHASE_CREATING host:"fuzzhost" reason:"Creating"} events:{reason:"Started" message:"m"}`,
	"IssueIdentityToken": `host:"fuzzhost" vm_id:"VMID" audience:"https://example.com"`,
}

// request is a random request for m: a template with a few fields
// changed, or one filled from scratch.
func (f *fuzzer) request(t *testing.T, m fuzzMethod) protoreflect.Message {
	msg := m.in.New()
	tmpl, ok := templates[m.short()]
	if !ok {
		tmpl, ok = hostTemplates[m.short()]
	}
	if !ok || f.r.IntN(3) == 0 {
		f.fill(msg, 0)
		return msg
	}
	if err := prototext.Unmarshal([]byte(strings.NewReplacer("VMID", f.vmID, `"vm1"`, `"`+f.vmName+`"`).Replace(tmpl)), msg.Interface()); err != nil {
		t.Fatalf("template of %s: %v", m.name, err)
	}
	for range f.r.IntN(4) {
		f.mutate(msg, 0)
	}
	return msg
}

// mutate changes one field of m (or of a message below it): cleared, or
// set to a random value.
func (f *fuzzer) mutate(m protoreflect.Message, depth int) {
	fields := m.Descriptor().Fields()
	fd := fields.Get(f.r.IntN(fields.Len()))
	if fd.Message() != nil && !fd.IsList() && !fd.IsMap() && depth < 3 && f.r.IntN(2) == 0 {
		f.mutate(m.Mutable(fd).Message(), depth+1)
		return
	}
	if f.r.IntN(4) == 0 {
		m.Clear(fd)
		return
	}
	if oo := fd.ContainingOneof(); oo != nil && !oo.IsSynthetic() {
		if set := m.WhichOneof(oo); set != nil {
			m.Clear(set)
		}
	}
	switch {
	case fd.IsList():
		l := m.Mutable(fd).List()
		if fd.Message() != nil {
			v := l.NewElement()
			f.fill(v.Message(), depth+1)
			l.Append(v)
		} else {
			l.Append(f.scalar(fd))
		}
	case fd.IsMap():
		mp := m.Mutable(fd).Map()
		if fd.MapValue().Message() != nil {
			v := mp.NewValue()
			f.fill(v.Message(), depth+1)
			mp.Set(f.scalar(fd.MapKey()).MapKey(), v)
		} else {
			mp.Set(f.scalar(fd.MapKey()).MapKey(), f.scalar(fd.MapValue()))
		}
	case fd.Message() != nil:
		m.Clear(fd)
		f.fill(m.Mutable(fd).Message(), depth+1)
	default:
		m.Set(fd, f.scalar(fd))
	}
}

func (m fuzzMethod) short() string { return m.name[strings.LastIndex(m.name, "/")+1:] }

// fuzzMethod is one RPC of the server.
type fuzzMethod struct {
	name                 string // /pkg.Service/Method
	in, out              protoreflect.MessageType
	clientSide, serverSd bool // streaming
}

// registeredMethods lists every method the server serves (its own
// registration, not the .proto files: a service it does not serve is not
// its surface), except the health service, which is grpc-go's.
func registeredMethods(t *testing.T, e *env) []fuzzMethod {
	var out []fuzzMethod
	infos := e.srv.GRPCServer().GetServiceInfo()
	var services []string
	for name := range infos {
		services = append(services, name)
	}
	sort.Strings(services)
	for _, svc := range services {
		if strings.HasPrefix(svc, "grpc.") {
			continue
		}
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(svc))
		if err != nil {
			t.Fatalf("service %s: %v", svc, err)
		}
		sd := d.(protoreflect.ServiceDescriptor)
		for i := 0; i < sd.Methods().Len(); i++ {
			md := sd.Methods().Get(i)
			in, err := protoregistry.GlobalTypes.FindMessageByName(md.Input().FullName())
			if err != nil {
				t.Fatal(err)
			}
			outT, err := protoregistry.GlobalTypes.FindMessageByName(md.Output().FullName())
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, fuzzMethod{name: "/" + svc + "/" + string(md.Name()), in: in, out: outT,
				clientSide: md.IsStreamingClient(), serverSd: md.IsStreamingServer()})
		}
	}
	return out
}

// call sends req and returns the call's error: for a stream, the first
// error other than its normal end, or nil. A server stream that is still
// open after a moment (a watch that was accepted) counts as a success.
func (m fuzzMethod) call(conn grpc.ClientConnInterface, req any, raw bool) error {
	var opts []grpc.CallOption
	if raw {
		opts = append(opts, grpc.ForceCodecV2(rawCodec{}))
	}
	if !m.clientSide && !m.serverSd {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		resp := m.out.New().Interface()
		var respAny any = resp
		if raw {
			respAny = &rawBody{}
		}
		return conn.Invoke(ctx, m.name, req, respAny, opts...)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := conn.NewStream(ctx, &grpc.StreamDesc{ClientStreams: m.clientSide, ServerStreams: m.serverSd}, m.name, opts...)
	if err != nil {
		return err
	}
	if err := s.SendMsg(req); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if err := s.CloseSend(); err != nil {
		return err
	}
	// A watch that is accepted stays open: stop reading after its first
	// answers.
	deadline := time.AfterFunc(300*time.Millisecond, cancel)
	defer deadline.Stop()
	for range 50 {
		var resp any = m.out.New().Interface()
		if raw {
			resp = &rawBody{}
		}
		err := s.RecvMsg(resp)
		switch {
		case errors.Is(err, io.EOF):
			return nil
		case err != nil && status.Code(err) == codes.Canceled && ctx.Err() != nil:
			return nil // our own cancel: the stream was serving
		case err != nil:
			return err
		}
	}
	return nil
}

// rawBody is a request or response as bytes, sent with rawCodec.
type rawBody struct{ b []byte }

type rawCodec struct{}

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	return mem.BufferSlice{mem.SliceBuffer(v.(*rawBody).b)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	v.(*rawBody).b = data.Materialize()
	return nil
}

func (rawCodec) Name() string { return "proto" }

// fuzzer fills messages from their descriptors.
type fuzzer struct {
	r            *rand.Rand
	vmName, vmID string   // the VM the templates name (reseed)
	baseNames    int      // names before the VM's
	names        []string // names and ids that exist, to reach past "not found"
}

// fill sets a random subset of m's fields.
func (f *fuzzer) fill(m protoreflect.Message, depth int) {
	fields := m.Descriptor().Fields()
	// Sparse or dense: sparse requests get further (fewer reasons to
	// refuse), dense ones hit more validation.
	p := []float64{0.2, 0.5, 0.9}[f.r.IntN(3)]
	for i := 0; i < fields.Len(); i++ {
		fd := fields.Get(i)
		if f.r.Float64() > p {
			continue
		}
		if oo := fd.ContainingOneof(); oo != nil && !oo.IsSynthetic() && m.WhichOneof(oo) != nil {
			continue
		}
		switch {
		case fd.IsList():
			l := m.Mutable(fd).List()
			for range f.count() {
				if fd.Message() != nil {
					v := l.NewElement()
					f.fill(v.Message(), depth+1)
					l.Append(v)
				} else {
					l.Append(f.scalar(fd))
				}
			}
		case fd.IsMap():
			mp := m.Mutable(fd).Map()
			for range f.count() {
				k := f.scalar(fd.MapKey()).MapKey()
				if fd.MapValue().Message() != nil {
					v := mp.NewValue()
					f.fill(v.Message(), depth+1)
					mp.Set(k, v)
				} else {
					mp.Set(k, f.scalar(fd.MapValue()))
				}
			}
		case fd.Message() != nil:
			if depth < 5 {
				f.fill(m.Mutable(fd).Message(), depth+1)
			}
		default:
			m.Set(fd, f.scalar(fd))
		}
	}
}

func (f *fuzzer) count() int {
	switch f.r.IntN(20) {
	case 0:
		return 50 + f.r.IntN(300) // many
	case 1, 2, 3:
		return 0
	default:
		return 1 + f.r.IntN(3)
	}
}

func (f *fuzzer) scalar(fd protoreflect.FieldDescriptor) protoreflect.Value {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return protoreflect.ValueOfBool(f.r.IntN(2) == 0)
	case protoreflect.EnumKind:
		vals := fd.Enum().Values()
		if f.r.IntN(5) == 0 {
			return protoreflect.ValueOfEnum(protoreflect.EnumNumber(f.pickInt(math.MinInt32, math.MaxInt32)))
		}
		return protoreflect.ValueOfEnum(vals.Get(f.r.IntN(vals.Len())).Number())
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return protoreflect.ValueOfInt32(int32(f.pickInt(math.MinInt32, math.MaxInt32)))
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return protoreflect.ValueOfInt64(f.pickInt(math.MinInt64, math.MaxInt64))
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return protoreflect.ValueOfUint32(uint32(f.pickInt(0, math.MaxUint32)))
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return protoreflect.ValueOfUint64(uint64(f.pickInt(0, math.MaxInt64)) * uint64(1+f.r.IntN(2)))
	case protoreflect.FloatKind:
		return protoreflect.ValueOfFloat32(float32(f.pickFloat()))
	case protoreflect.DoubleKind:
		return protoreflect.ValueOfFloat64(f.pickFloat())
	case protoreflect.StringKind:
		return protoreflect.ValueOfString(f.str())
	case protoreflect.BytesKind:
		return protoreflect.ValueOfBytes(f.bytes())
	}
	panic("unhandled kind " + fd.Kind().String())
}

func (f *fuzzer) pickInt(lo, hi int64) int64 {
	interesting := []int64{0, 1, -1, 2, 7, 64, 1024, 1 << 20, 1 << 31, -(1 << 31), 1<<31 - 1, 1 << 40, math.MaxInt64, math.MinInt64}
	for range 10 {
		var v int64
		if f.r.IntN(2) == 0 {
			v = interesting[f.r.IntN(len(interesting))]
		} else {
			v = int64(f.r.Uint64())
			if f.r.IntN(2) == 0 {
				v %= 100000
			}
		}
		if v >= lo && v <= hi {
			return v
		}
	}
	return lo
}

func (f *fuzzer) pickFloat() float64 {
	return []float64{0, -1, 1, 0.5, 1e308, -1e308, math.NaN(), math.Inf(1), math.Inf(-1), math.Copysign(0, -1), f.r.Float64() * 100}[f.r.IntN(11)]
}

// str is a string worth sending: a name that exists, a plausible one, or
// one that breaks assumptions (huge, unicode, NUL, control characters,
// paths, markup).
func (f *fuzzer) str() string {
	switch f.r.IntN(16) {
	case 0, 1, 2, 3, 4:
		return f.names[f.r.IntN(len(f.names))]
	case 5:
		return ""
	case 6:
		return fmt.Sprintf("fz-%d", f.r.IntN(50))
	case 7:
		return strings.Repeat("a", []int{63, 64, 254, 255, 256, 4097, 64<<10 + 1, 1 << 20}[f.r.IntN(8)])
	case 8:
		return []string{"ünïcødé", "日本語", "🙂🙃", "\u202eevil", "Ω≈ç√", "ǅ", "ﬁ"}[f.r.IntN(7)]
	case 9:
		return "a\x00b"
	case 10:
		return []string{"../../etc/passwd", "/", ".", "..", "a/b", "*", "%s%n", "${x}", "<script>", "'; DROP", "\\"}[f.r.IntN(11)]
	case 11:
		return []string{"0.0.0.0/0", "::/0", "10.0.0.0/8", "300.1.1.1/33", "10.1.2.3/24", "10.250.0.0/29", "169.254.0.0/16", "fe80::/64", "1.2.3.4"}[f.r.IntN(9)]
	case 12:
		return []string{" ", "\t", "\n", "a\nb", "\r\n", "-", "-a", "a-", "A", "a.b", "a_b"}[f.r.IntN(11)]
	case 13:
		return []string{"sha256:" + strings.Repeat("0", 64), strings.Repeat("f", 64), "00000000-0000-0000-0000-000000000000", "52:54:00:00:00:01"}[f.r.IntN(4)]
	case 14:
		b := make([]rune, 1+f.r.IntN(40))
		for i := range b {
			b[i] = rune(f.r.IntN(0x2FFFF))
			if !utf8.ValidRune(b[i]) {
				b[i] = 'x'
			}
		}
		return string(b)
	default:
		return strconv.FormatInt(f.pickInt(math.MinInt64, math.MaxInt64), 10)
	}
}

func (f *fuzzer) bytes() []byte {
	n := []int{0, 1, 16, 1024, 64 << 10, 64<<10 + 1}[f.r.IntN(6)]
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(f.r.Uint32())
	}
	return b
}

// malformed is a body that is not a valid encoding of in: random bytes, a
// valid encoding cut short or with bytes flipped, or invalid UTF-8 where a
// string belongs.
func (f *fuzzer) malformed(in protoreflect.MessageType) []byte {
	msg := in.New()
	f.fill(msg, 0)
	valid, _ := proto.Marshal(msg.Interface())
	switch f.r.IntN(4) {
	case 0:
		b := make([]byte, 1+f.r.IntN(200))
		for i := range b {
			b[i] = byte(f.r.Uint32())
		}
		return b
	case 1:
		if len(valid) > 1 {
			return valid[:1+f.r.IntN(len(valid)-1)]
		}
		return []byte{0x0a}
	case 2:
		b := append([]byte(nil), valid...)
		for range 1 + f.r.IntN(4) {
			if len(b) > 0 {
				b[f.r.IntN(len(b))] ^= byte(1 + f.r.IntN(255))
			}
		}
		return b
	default:
		// Field 1, length-delimited, invalid UTF-8: a string field refuses
		// it, a message field reads garbage.
		return append(valid, 0x0a, 0x02, 0xff, 0xfe)
	}
}

// dumped is etcd's content with each key's lease.
type dumped struct {
	kvs    map[string]string
	leases map[string]int64
}

func dumpWithLeases(t *testing.T, e *env) dumped {
	t.Helper()
	d := dumped{kvs: map[string]string{}, leases: map[string]int64{}}
	// Everything but the audit records, read around them (they grow with
	// every call): a refused call still leaves its record (TestAuditLog).
	for _, r := range [][2]string{
		{store.Prefix, store.AuditPrefix},
		{clientv3.GetPrefixRangeEnd(store.AuditPrefix), clientv3.GetPrefixRangeEnd(store.Prefix)},
	} {
		resp, err := e.etcd.Get(ctx(t), r[0], clientv3.WithRange(r[1]))
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range resp.Kvs {
			d.kvs[string(kv.Key)] = string(kv.Value)
			d.leases[string(kv.Key)] = kv.Lease
		}
	}
	return d
}

// storeDiff describes how etcd differs from before, ignoring keys removed
// because their lease expired.
func storeDiff(t *testing.T, e *env, before dumped) string {
	t.Helper()
	after := dumpWithLeases(t, e)
	var diff []string
	for k, v := range before.kvs {
		av, ok := after.kvs[k]
		switch {
		case !ok && before.leases[k] != 0 && leaseGone(t, e, before.leases[k]):
		case !ok:
			diff = append(diff, "  - "+k)
		case av != v:
			diff = append(diff, "  ~ "+k)
		}
	}
	for k := range after.kvs {
		if _, ok := before.kvs[k]; !ok {
			diff = append(diff, "  + "+k)
		}
	}
	sort.Strings(diff)
	return strings.Join(diff, "\n")
}

func leaseGone(t *testing.T, e *env, id int64) bool {
	resp, err := e.etcd.TimeToLive(ctx(t), clientv3.LeaseID(id))
	return err == nil && resp.TTL <= 0
}

// TestNegativeResourceVersionIsInvalid: found by TestFuzzEveryRPC — a
// negative resource_version on a VM action was answered ABORTED ("changed,
// read it again and retry"), which no retry can fix.
func TestNegativeResourceVersionIsInvalid(t *testing.T) {
	e := newEnv(t)
	e.seed()
	e.createVM("vm1")
	before := e.dump(t)
	_, err := e.vms.StopVM(ctx(t), &minicloudv1.VMActionRequest{Name: "vm1", ResourceVersion: -5})
	wantCode(t, err, codes.InvalidArgument, "resource_version -5 is negative")
	_, err = e.vms.DeleteVM(ctx(t), &minicloudv1.DeleteVMRequest{Name: "vm1", ResourceVersion: math.MinInt64})
	wantCode(t, err, codes.InvalidArgument, "is negative")
	e.wantUnchanged(t, before)
}
