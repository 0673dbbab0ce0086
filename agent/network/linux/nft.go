package linux

import (
	"bytes"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"slices"

	"github.com/google/nftables"
	"golang.org/x/sys/unix"

	"github.com/minicloud/minicloud/agent/network"
)

// batch collects one nftables transaction. Every change the Manager makes
// to the ruleset is exactly one batch: the kernel applies it atomically, so a
// reader (a packet) sees the old ruleset or the new one, never a mix.
type batch struct {
	conn *nftables.Conn
	sets map[*nftables.Table][]*nftables.Set
	// changes counts queued messages: a converged state sends nothing.
	changes int
	// protected are the management networks guests may not reach.
	protected []netip.Prefix
}

func newBatch(protected []netip.Prefix) (*batch, error) {
	c, err := nftables.New()
	if err != nil {
		return nil, fmt.Errorf("open nftables: %w", err)
	}
	return &batch{conn: c, sets: newSets(), protected: protected}, nil
}

func (b *batch) set(t *nftables.Table, name string) *nftables.Set { return findSet(b.sets[t], name) }

func (b *batch) flush(what string) error {
	if b.changes == 0 {
		return nil
	}
	if err := b.conn.Flush(); err != nil {
		return fmt.Errorf("nftables: %s: %w", what, err)
	}
	return nil
}

// ensureBase makes sure both tables, their chains, sets and static rules
// exist, adding what is missing to the batch. Existing set elements are never
// touched, and a chain whose rules differ from this generation's is replaced
// within the same transaction, so filtering has no gap.
func (b *batch) ensureBase() error {
	tables, err := b.conn.ListTables()
	if err != nil {
		return fmt.Errorf("list nftables tables: %w", err)
	}
	have := map[nftables.TableFamily]bool{}
	for _, t := range tables {
		if t.Name == tableName {
			have[t.Family] = true
		}
	}
	fresh := map[*nftables.Table]bool{}
	for _, t := range []*nftables.Table{bridgeTable, inetTable} {
		if !have[t.Family] {
			fresh[t] = true
			b.changes++
			b.conn.AddTable(t)
		}
	}
	chains := newChains()
	existingChains := map[string]bool{}
	if len(fresh) < 2 {
		all, err := b.conn.ListChains()
		if err != nil {
			return fmt.Errorf("list nftables chains: %w", err)
		}
		for _, c := range all {
			if c.Table.Name == tableName {
				existingChains[chainKey(c.Table.Family, c.Name)] = true
			}
		}
	}
	for _, c := range chains {
		if !existingChains[chainKey(c.Table.Family, c.Name)] {
			b.changes++
			b.conn.AddChain(c)
		}
	}
	for t, sets := range b.sets {
		var existing []*nftables.Set
		if !fresh[t] {
			if existing, err = b.conn.GetSets(t); err != nil {
				return fmt.Errorf("list sets of %s: %w", describe(t), err)
			}
		}
		for _, s := range sets {
			if slices.ContainsFunc(existing, func(e *nftables.Set) bool { return e.Name == s.Name }) {
				continue
			}
			var elems []nftables.SetElement
			if t == bridgeTable && s.Name == setReserved {
				elems = []nftables.SetElement{{Key: network.MetadataAddr.AsSlice()}}
			}
			b.changes++
			if err := b.conn.AddSet(s, elems); err != nil {
				return fmt.Errorf("add set %s: %w", s.Name, err)
			}
		}
	}
	want := staticRules(b.sets, b.protected)
	for _, c := range chains {
		rules, ok := want[c.Name]
		if !ok {
			continue
		}
		if existingChains[chainKey(c.Table.Family, c.Name)] {
			got, err := b.conn.GetRules(c.Table, c)
			if err != nil {
				return fmt.Errorf("list rules of chain %s: %w", c.Name, err)
			}
			if sameComments(got, rules) {
				continue
			}
			b.conn.FlushChain(c)
		}
		b.changes++
		for _, r := range rules {
			b.conn.AddRule(r.rule(c))
		}
	}
	return nil
}

func sameComments(got []*nftables.Rule, want []staticRule) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if ruleComment(got[i]) != ruleGeneration+": "+want[i].comment {
			return false
		}
	}
	return true
}

func chainKey(f nftables.TableFamily, name string) string { return fmt.Sprintf("%d/%s", f, name) }

func describe(t *nftables.Table) string {
	if t.Family == nftables.TableFamilyBridge {
		return "table bridge " + t.Name
	}
	return "table inet " + t.Name
}

// elements reads a set; a missing table or set reads as empty.
func (b *batch) elements(t *nftables.Table, name string) ([]nftables.SetElement, error) {
	s, err := b.conn.GetSetByName(t, name)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil // the set does not exist (yet): ensureBase creates it
	}
	if err != nil {
		return nil, fmt.Errorf("look up set %s: %w", name, err)
	}
	els, err := b.conn.GetSetElements(s)
	if err != nil {
		return nil, fmt.Errorf("read set %s: %w", name, err)
	}
	return els, nil
}

// replaceKeys converges the elements of set whose key starts with prefix to
// exactly want: it deletes the others and adds the missing ones, reading the
// set first because deleting an absent element fails the whole transaction.
func (b *batch) replaceKeys(t *nftables.Table, name string, prefix []byte, want [][]byte) error {
	els, err := b.elements(t, name)
	if err != nil {
		return err
	}
	s := b.set(t, name)
	var del, add []nftables.SetElement
	present := map[string]bool{}
	for _, e := range els {
		if !bytes.HasPrefix(e.Key, prefix) {
			continue
		}
		present[string(e.Key)] = true
		if !slices.ContainsFunc(want, func(k []byte) bool { return bytes.Equal(k, e.Key) }) {
			del = append(del, nftables.SetElement{Key: e.Key})
		}
	}
	for _, k := range want {
		if !present[string(k)] {
			add = append(add, nftables.SetElement{Key: k})
		}
	}
	b.changes += len(del) + len(add)
	if len(del) > 0 {
		if err := b.conn.SetDeleteElements(s, del); err != nil {
			return fmt.Errorf("delete from set %s: %w", name, err)
		}
	}
	if len(add) > 0 {
		if err := b.conn.SetAddElements(s, add); err != nil {
			return fmt.Errorf("add to set %s: %w", name, err)
		}
	}
	return nil
}

// portFilter is what the ruleset knows about one port.
type portFilter struct {
	mac net.HardwareAddr
	ip  netip.Addr
}

// portFilters reads every port's MAC and IP from the bridge table's sets.
func (b *batch) portFilters() (map[string]portFilter, error) {
	out := map[string]portFilter{}
	macs, err := b.elements(bridgeTable, setPortMAC)
	if err != nil {
		return nil, err
	}
	for _, e := range macs {
		if len(e.Key) < 16+6 {
			continue
		}
		name := ifnameFromKey(e.Key)
		f := out[name]
		f.mac = net.HardwareAddr(slices.Clone(e.Key[16 : 16+6]))
		out[name] = f
	}
	ips, err := b.elements(bridgeTable, setPortIP4)
	if err != nil {
		return nil, err
	}
	for _, e := range ips {
		if len(e.Key) < 16+4 {
			continue
		}
		name := ifnameFromKey(e.Key)
		f := out[name]
		f.ip, _ = netip.AddrFromSlice(e.Key[16 : 16+4])
		out[name] = f
	}
	return out, nil
}

// bridgeGateways reads the gateway of every bridge from the inet table.
func (b *batch) bridgeGateways() (map[string]netip.Addr, error) {
	els, err := b.elements(inetTable, setBridgeGW)
	if err != nil {
		return nil, err
	}
	out := map[string]netip.Addr{}
	for _, e := range els {
		if len(e.Key) < 16+4 {
			continue
		}
		out[ifnameFromKey(e.Key)], _ = netip.AddrFromSlice(e.Key[16 : 16+4])
	}
	return out, nil
}

// setReservedTo converges reserved_ip4 to the metadata address plus the given
// gateways.
func (b *batch) setReservedTo(gws map[string]netip.Addr) error {
	want := [][]byte{network.MetadataAddr.AsSlice()}
	for _, gw := range gws {
		if !slices.ContainsFunc(want, func(k []byte) bool { return bytes.Equal(k, gw.AsSlice()) }) {
			want = append(want, gw.AsSlice())
		}
	}
	return b.replaceKeys(bridgeTable, setReserved, nil, want)
}

// natRules lists the masquerade rules by comment.
func (b *batch) natRules() (map[string]*nftables.Rule, error) {
	c := &nftables.Chain{Table: inetTable, Name: chainPostrouting}
	rules, err := b.conn.GetRules(inetTable, c)
	if errors.Is(err, unix.ENOENT) {
		return nil, nil // no table or chain yet: no rules
	}
	if err != nil {
		return nil, fmt.Errorf("list NAT rules: %w", err)
	}
	out := map[string]*nftables.Rule{}
	for _, r := range rules {
		out[ruleComment(r)] = r
	}
	return out, nil
}
