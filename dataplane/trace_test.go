package dataplane

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// The tracer walks a Ruleset as the kernel would walk the table, for one
// packet that starts a connection: which endpoints it can reach and
// whether it is masqueraded, or whether it is rejected. It evaluates our
// typed statements, so a test can ask "where does this packet go?"
// without a kernel.

type packet struct {
	src, dst netip.Addr
	proto    Protocol
	dport    uint16
	iifname  string
	local    bool // generated on the node (output hook) rather than arriving
	// dnat: the packet was DNATed from origDst:origDport, as its
	// conntrack entry's original tuple says (after the nat hooks).
	dnat      bool
	origDst   netip.Addr
	origDport uint16
}

type outcome struct {
	rejected   bool
	dropped    bool
	endpoints  []netip.AddrPort // every endpoint numgen may pick, sorted
	masquerade bool             // for the first endpoint (hairpin aside, the same for all)
	hairpin    map[netip.AddrPort]bool
	// affinity is the map the path after DNAT records the client's
	// endpoint in, with affinityTimeout.
	affinity        string
	affinityTimeout uint32
}

func (o outcome) String() string {
	if o.rejected {
		return "rejected"
	}
	if o.dropped {
		return "dropped"
	}
	if len(o.endpoints) == 0 {
		return "not handled"
	}
	var parts []string
	for _, ep := range o.endpoints {
		s := ep.String()
		if o.masquerade || o.hairpin[ep] {
			s += " (masqueraded)"
		}
		parts = append(parts, s)
	}
	return strings.Join(parts, ", ")
}

type tracer struct {
	rs       *Ruleset
	chains   map[string]*Chain
	elements map[string][]Element
	// affinity holds what the packet path put in the affinity maps:
	// client . frontend to endpoint, as stick records it.
	affinity map[string]map[Key]netip.AddrPort
}

func newTracer(rs *Ruleset) *tracer {
	t := &tracer{rs: rs, chains: map[string]*Chain{}, elements: map[string][]Element{}, affinity: map[string]map[Key]netip.AddrPort{}}
	for _, c := range allChains(rs) {
		t.chains[c.Name] = c
	}
	for _, s := range rs.Base.Sets {
		t.elements[s.Name] = append(t.elements[s.Name], s.Elements...)
	}
	for _, key := range rs.ServiceKeys() {
		for _, e := range rs.Services[key].Elements {
			t.elements[e.Set] = append(t.elements[e.Set], e)
		}
	}
	return t
}

// affinityKey is the affinity map key of a packet: client and frontend.
func affinityKeyOf(p packet) Key {
	return Key{Addr: p.src, Addr2: p.dst, Proto: p.proto, Port: p.dport}
}

// stick records, as the kernel's dynset after DNAT would, that p's client
// was sent to ep, in set (a trace's outcome names it).
func (t *tracer) stick(set string, p packet, ep netip.AddrPort) {
	if t.affinity[set] == nil {
		t.affinity[set] = map[Key]netip.AddrPort{}
	}
	t.affinity[set][affinityKeyOf(p)] = ep
}

// state is what evaluation has done to the packet so far.
type evalState struct {
	mark     uint32
	dnat     []netip.AddrPort
	rejected bool
	dropped  bool
	// affinity is the map a RecordAffinity after DNAT recorded in.
	affinity        string
	affinityTimeout uint32
}

// trace runs the hooks a new connection meets. Arriving: nat prerouting,
// then filter forward or input. Generated on the node: filter output
// before DNAT, nat output, filter output after DNAT (and input when it
// stays on the node). Then postrouting, for DNATed packets.
func (t *tracer) trace(p packet) outcome {
	var st evalState
	first := chainFilterPrerouting
	if p.local {
		first = chainFilterOutput
	}
	t.run(first, p, &st)
	if st.rejected || st.dropped {
		return outcome{rejected: st.rejected, dropped: st.dropped}
	}
	nat := chainNATPrerouting
	if p.local {
		nat = chainNATOutput
	}
	t.run(nat, p, &st)
	if len(st.dnat) == 0 {
		switch {
		case p.local:
			t.run(chainFilterOutputPostDNAT, p, &st)
			if !st.rejected && !st.dropped && t.isNodeAddr(p.dst) {
				t.run(chainFilterInput, p, &st)
			}
		case t.isNodeAddr(p.dst):
			t.run(chainFilterInput, p, &st)
		default:
			t.run(chainFilterForward, p, &st)
		}
		return outcome{rejected: st.rejected, dropped: st.dropped}
	}
	out := outcome{endpoints: st.dnat, hairpin: map[netip.AddrPort]bool{}}
	for _, ep := range st.dnat {
		q := p
		q.dst, q.dport = ep.Addr(), ep.Port()
		q.dnat, q.origDst, q.origDport = true, p.dst, p.dport
		// The filter hooks after DNAT: they record session affinity.
		filter := evalState{mark: st.mark}
		switch {
		case p.local:
			t.run(chainFilterOutputPostDNAT, q, &filter)
			if !filter.rejected && !filter.dropped && t.isNodeAddr(q.dst) {
				t.run(chainFilterInput, q, &filter)
			}
		case t.isNodeAddr(q.dst):
			t.run(chainFilterInput, q, &filter)
		default:
			t.run(chainFilterForward, q, &filter)
		}
		post := evalState{mark: st.mark}
		masq := t.runPost(q, &post)
		if ep == st.dnat[0] {
			out.masquerade = masq && st.mark != 0
			out.affinity, out.affinityTimeout = filter.affinity, filter.affinityTimeout
			out.rejected, out.dropped = filter.rejected, filter.dropped
		}
		if masq && st.mark == 0 {
			out.hairpin[ep] = true
		}
	}
	return out
}

func (t *tracer) isNodeAddr(a netip.Addr) bool {
	for _, e := range t.elements[familySet(setNodePortIPs, familyOf(a))] {
		if e.Key.Addr == a {
			return true
		}
	}
	return false
}

// runPost reports whether postrouting masquerades the DNATed packet.
func (t *tracer) runPost(p packet, st *evalState) bool {
	masq := false
	t.eval(chainNATPostrouting, p, st, &masq)
	return masq
}

func (t *tracer) run(chain string, p packet, st *evalState) {
	var masq bool
	t.eval(chain, p, st, &masq)
}

// eval runs a chain; it returns false when a verdict ended evaluation of
// the hook (goto chains return through their caller's frame as nft does).
func (t *tracer) eval(chain string, p packet, st *evalState, masq *bool) bool {
	c, ok := t.chains[chain]
	if !ok {
		panic("trace: no chain " + chain)
	}
rules:
	for _, r := range c.Rules {
		for _, s := range r.Stmts {
			switch s := s.(type) {
			case MatchCtStateNew:
			case MatchAddr:
				a := p.src
				if s.Field == Daddr {
					a = p.dst
				}
				if familyOf(a) != familyOf(s.Prefix.Addr()) || s.Prefix.Contains(a) == s.Negate {
					continue rules
				}
			case MatchAddrSet:
				a := p.src
				if s.Field == Daddr {
					a = p.dst
				}
				if familyOf(a) != s.Family || !slices.ContainsFunc(t.elements[s.Set], func(e Element) bool { return e.Key.Addr == a }) {
					continue rules
				}
			case MatchAddrPairSet:
				if familyOf(p.src) != s.Family || !slices.ContainsFunc(t.elements[s.Set], func(e Element) bool {
					return e.Key.Addr == p.src && e.Key.Addr2 == p.dst
				}) {
					continue rules
				}
			case MatchFibSaddrLocal:
				if !p.local {
					continue rules
				}
			case MatchFrontendSet:
				if familyOf(p.dst) != s.Family || !slices.ContainsFunc(t.elements[s.Set], func(e Element) bool {
					return e.Key.Addr == p.dst && e.Key.Proto == p.proto && e.Key.Port == p.dport
				}) {
					continue rules
				}
			case MatchFirewallAllowed:
				allowed := slices.ContainsFunc(t.elements[s.Set], func(e Element) bool {
					return e.Key.Addr == p.dst && e.Key.Proto == p.proto && e.Key.Port == p.dport && e.Key.Source.Contains(p.src)
				})
				if familyOf(p.dst) != s.Family || allowed == s.Negate {
					continue rules
				}
			case DNATAffinity:
				ep, ok := t.affinity[s.Set][affinityKeyOf(p)]
				if familyOf(p.dst) != s.Family || !ok {
					continue rules
				}
				st.dnat = append(st.dnat, ep)
				return true
			case MatchCtStatusDNAT:
				if !p.dnat {
					continue rules
				}
			case MatchCtOriginalDaddrSet:
				if familyOf(p.origDst) != s.Family || !slices.ContainsFunc(t.elements[s.Set], func(e Element) bool { return e.Key.Addr == p.origDst }) {
					continue rules
				}
			case CtFrontendVmap:
				if !p.dnat || familyOf(p.origDst) != s.Family {
					continue rules
				}
				orig := p
				orig.dst, orig.dport = p.origDst, p.origDport
				v, found := t.lookupVerdict(VmapLookup{Key: s.Key, Map: s.Map}, orig)
				if !found {
					continue rules
				}
				if terminal, next := t.verdict(v, p, st, masq); terminal || !next {
					return terminal
				}
				continue rules
			case RecordAffinity:
				if !p.dnat || familyOf(p.src) != s.Family {
					continue rules
				}
				st.affinity, st.affinityTimeout = s.Set, s.Timeout
			case MatchIifnamePrefix:
				if strings.HasPrefix(p.iifname, s.Prefix) == s.Negate {
					continue rules
				}
			case MatchL4Proto:
				if p.proto != s.Proto {
					continue rules
				}
			case MatchMarkUnset:
				if st.mark&s.Mask != 0 {
					continue rules
				}
			case VmapLookup:
				v, found := t.lookupVerdict(s, p)
				if !found {
					continue rules
				}
				if terminal, next := t.verdict(v, p, st, masq); terminal || !next {
					return terminal
				}
				continue rules
			case SetMarkBits:
				st.mark |= s.Bits
			case ClearMarkBits:
				st.mark ^= s.Bits
			case Masquerade:
				*masq = true
				return true
			case DNATRandom:
				if familyOf(p.dst) != s.Family {
					continue rules
				}
				for i := range s.Count {
					idx := s.Offset + i
					j := slices.IndexFunc(t.elements[s.Map], func(e Element) bool { return e.Key.Index == idx })
					if j < 0 {
						panic(fmt.Sprintf("trace: %s has no index %d", s.Map, idx))
					}
					st.dnat = append(st.dnat, t.elements[s.Map][j].Target)
				}
				slices.SortFunc(st.dnat, netip.AddrPort.Compare)
				return true
			case Reject:
				st.rejected = true
				return true
			case VerdictStmt:
				if terminal, next := t.verdict(s.Verdict, p, st, masq); terminal || !next {
					return terminal
				}
				continue rules
			default:
				panic(fmt.Sprintf("trace: statement %T", s))
			}
		}
	}
	return false
}

func (t *tracer) verdict(v Verdict, p packet, st *evalState, masq *bool) (terminal, next bool) {
	switch v.Kind {
	case VerdictJump:
		return t.eval(v.Chain, p, st, masq), true
	case VerdictGoto:
		return t.eval(v.Chain, p, st, masq), false
	case VerdictReturn:
		return false, false
	case VerdictDrop:
		st.dropped = true
		return true, false
	}
	return true, false
}

func (t *tracer) lookupVerdict(s VmapLookup, p packet) (Verdict, bool) {
	for _, e := range t.elements[s.Map] {
		k := e.Key
		switch s.Key {
		case KeyAddr4ProtoPort, KeyAddr6ProtoPort:
			if k.Addr == p.dst && k.Proto == p.proto && k.Port == p.dport {
				return e.Verdict, true
			}
		case KeyProtoPort:
			if k.Proto == p.proto && k.Port == p.dport {
				return e.Verdict, true
			}
		}
	}
	return Verdict{}, false
}
