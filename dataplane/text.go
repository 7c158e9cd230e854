package dataplane

import (
	"fmt"
	"net/netip"
	"slices"
	"strings"
)

// String prints the ruleset in nft's syntax, sorted, as `nft list table`
// would show it (modulo layout): for golden tests and for logs at the
// highest verbosity.
func (r *Ruleset) String() string {
	var b strings.Builder
	fmt.Fprintf(&b, "table inet %s {\n", TableName)
	elements := map[string][]Element{}
	for _, key := range r.ServiceKeys() {
		for _, e := range r.Services[key].Elements {
			elements[e.Set] = append(elements[e.Set], e)
		}
	}
	for _, set := range r.Base.Sets {
		all := append(slices.Clone(set.Elements), elements[set.Name]...)
		slices.SortFunc(all, compareElements)
		writeSet(&b, set, all)
	}
	for _, c := range allChains(r) {
		writeChain(&b, c)
	}
	b.WriteString("}\n")
	return b.String()
}

func writeSet(b *strings.Builder, s *Set, elements []Element) {
	kind, typ := "set", "type "+keyTypeName(s.Key)
	switch s.Data {
	case DataVerdict:
		kind, typ = "map", typ+" : verdict"
	case DataEndpoint4:
		kind, typ = "map", "typeof numgen random mod 1 : ip daddr . tcp dport"
	case DataEndpoint6:
		kind, typ = "map", "typeof numgen random mod 1 : ip6 daddr . tcp dport"
	}
	if s.Key == KeyAffinity4 || s.Key == KeyAffinity6 {
		ip := ipName(familyOfKey(s.Key))
		typ = fmt.Sprintf("typeof %s saddr . %s daddr . meta l4proto . th dport : %s daddr . tcp dport", ip, ip, ip)
	}
	fmt.Fprintf(b, "\t%s %s {\n\t\t%s\n", kind, s.Name, typ)
	switch {
	case s.Flags&SetInterval != 0:
		b.WriteString("\t\tflags interval\n")
	case s.Flags&SetDynamic != 0:
		if s.Size != 0 {
			fmt.Fprintf(b, "\t\tsize %d\n", s.Size)
		}
		b.WriteString("\t\tflags dynamic,timeout\n")
	}
	if s.Comment != "" {
		fmt.Fprintf(b, "\t\tcomment %q\n", s.Comment)
	}
	if len(elements) > 0 {
		b.WriteString("\t\telements = {\n")
		for _, e := range elements {
			fmt.Fprintf(b, "\t\t\t%s", keyString(s.Key, e.Key))
			switch s.Data {
			case DataVerdict:
				fmt.Fprintf(b, " : %s", e.Verdict)
			case DataEndpoint4, DataEndpoint6:
				fmt.Fprintf(b, " : %s . %d", e.Target.Addr(), e.Target.Port())
			}
			if e.Comment != "" {
				fmt.Fprintf(b, " comment %q", e.Comment)
			}
			b.WriteString(",\n")
		}
		b.WriteString("\t\t}\n")
	}
	b.WriteString("\t}\n")
}

func writeChain(b *strings.Builder, c *Chain) {
	fmt.Fprintf(b, "\tchain %s {\n", c.Name)
	if c.Hook != nil {
		fmt.Fprintf(b, "\t\ttype %s hook %s priority %d; policy accept;\n", c.Hook.Type, c.Hook.Hook, c.Hook.Priority)
	}
	for _, r := range c.Rules {
		fmt.Fprintf(b, "\t\t%s\n", r)
	}
	b.WriteString("\t}\n")
}

func keyTypeName(k KeyType) string {
	switch k {
	case KeyAddr4:
		return "ipv4_addr"
	case KeyAddr6:
		return "ipv6_addr"
	case KeyAddr4ProtoPort:
		return "ipv4_addr . inet_proto . inet_service"
	case KeyAddr6ProtoPort:
		return "ipv6_addr . inet_proto . inet_service"
	case KeyProtoPort:
		return "inet_proto . inet_service"
	case KeyAddr4Pair:
		return "ipv4_addr . ipv4_addr"
	case KeyAddr6Pair:
		return "ipv6_addr . ipv6_addr"
	case KeyAffinity4:
		return "ipv4_addr . ipv4_addr . inet_proto . inet_service"
	case KeyAffinity6:
		return "ipv6_addr . ipv6_addr . inet_proto . inet_service"
	case KeyFirewall4:
		return "ipv4_addr . inet_proto . inet_service . ipv4_addr"
	case KeyFirewall6:
		return "ipv6_addr . inet_proto . inet_service . ipv6_addr"
	}
	return "integer"
}

func keyString(t KeyType, k Key) string {
	switch t {
	case KeyAddr4, KeyAddr6:
		return k.Addr.String()
	case KeyAddr4ProtoPort, KeyAddr6ProtoPort:
		return fmt.Sprintf("%s . %s . %d", k.Addr, k.Proto, k.Port)
	case KeyProtoPort:
		return fmt.Sprintf("%s . %d", k.Proto, k.Port)
	case KeyAddr4Pair, KeyAddr6Pair:
		return fmt.Sprintf("%s . %s", k.Addr, k.Addr2)
	case KeyAffinity4, KeyAffinity6:
		return fmt.Sprintf("%s . %s . %s . %d", k.Addr, k.Addr2, k.Proto, k.Port)
	case KeyFirewall4, KeyFirewall6:
		return fmt.Sprintf("%s . %s . %d . %s", k.Addr, k.Proto, k.Port, prefixString(k.Source))
	}
	return fmt.Sprint(k.Index)
}

func (v Verdict) String() string {
	switch v.Kind {
	case VerdictAccept:
		return "accept"
	case VerdictDrop:
		return "drop"
	case VerdictReturn:
		return "return"
	case VerdictJump:
		return "jump " + v.Chain
	case VerdictGoto:
		return "goto " + v.Chain
	}
	return "continue"
}

func (r Rule) String() string {
	parts := make([]string, 0, len(r.Stmts)+1)
	for _, s := range r.Stmts {
		parts = append(parts, stmtString(s))
	}
	if r.Comment != "" {
		parts = append(parts, fmt.Sprintf("comment %q", r.Comment))
	}
	return strings.Join(parts, " ")
}

func addrFieldString(fam Family, f AddrField) string {
	proto := "ip"
	if fam == IPv6 {
		proto = "ip6"
	}
	if f == Saddr {
		return proto + " saddr"
	}
	return proto + " daddr"
}

func prefixString(p netip.Prefix) string {
	if p.IsSingleIP() {
		return p.Addr().String()
	}
	return p.String()
}

func stmtString(s Stmt) string {
	switch s := s.(type) {
	case MatchCtStateNew:
		return "ct state new"
	case MatchAddr:
		op := ""
		if s.Negate {
			op = "!= "
		}
		return fmt.Sprintf("%s %s%s", addrFieldString(familyOf(s.Prefix.Addr()), s.Field), op, prefixString(s.Prefix))
	case MatchAddrSet:
		return fmt.Sprintf("%s @%s", addrFieldString(s.Family, s.Field), s.Set)
	case MatchIifnamePrefix:
		op := ""
		if s.Negate {
			op = "!= "
		}
		return fmt.Sprintf("iifname %s%q", op, s.Prefix+"*")
	case MatchL4Proto:
		return "meta l4proto " + s.Proto.String()
	case MatchMarkUnset:
		return fmt.Sprintf("meta mark & 0x%08x == 0x00000000", s.Mask)
	case VmapLookup:
		return vmapKeyString(s.Key) + " vmap @" + s.Map
	case MatchAddrPairSet:
		return fmt.Sprintf("%s . %s @%s", addrFieldString(s.Family, Saddr), addrFieldString(s.Family, Daddr), s.Set)
	case DNATRandom:
		offset := ""
		if s.Offset != 0 {
			offset = fmt.Sprintf(" offset %d", s.Offset)
		}
		return fmt.Sprintf("dnat %s to numgen random mod %d%s map @%s", ipName(s.Family), s.Count, offset, s.Map)
	case RecordAffinity:
		ip := ipName(s.Family)
		return fmt.Sprintf("update @%s { ct original %s saddr . ct original %s daddr . ct protocol . ct original proto-dst timeout %s : ct reply %s saddr . ct reply proto-src }",
			s.Set, ip, ip, durationString(s.Timeout), ip)
	case DNATAffinity:
		return fmt.Sprintf("dnat %s to %s map @%s", ipName(s.Family), affinityKeyString(s.Family), s.Set)
	case MatchCtStatusDNAT:
		return "ct status dnat"
	case MatchCtOriginalDaddrSet:
		return fmt.Sprintf("ct original %s daddr @%s", ipName(s.Family), s.Set)
	case CtFrontendVmap:
		key := "ct protocol . ct original proto-dst"
		if s.Key != KeyProtoPort {
			key = fmt.Sprintf("ct original %s daddr . %s", ipName(s.Family), key)
		}
		return key + " vmap @" + s.Map
	case MatchFibSaddrLocal:
		return "fib saddr type local"
	case MatchFrontendSet:
		return fmt.Sprintf("%s . meta l4proto . th dport @%s", addrFieldString(s.Family, Daddr), s.Set)
	case MatchFirewallAllowed:
		op := ""
		if s.Negate {
			op = "!= "
		}
		return fmt.Sprintf("%s . meta l4proto . th dport . %s %s@%s", addrFieldString(s.Family, Daddr), addrFieldString(s.Family, Saddr), op, s.Set)
	case SetMarkBits:
		return fmt.Sprintf("meta mark set meta mark | 0x%08x", s.Bits)
	case ClearMarkBits:
		return fmt.Sprintf("meta mark set meta mark ^ 0x%08x", s.Bits)
	case Masquerade:
		return "masquerade fully-random"
	case Reject:
		if s.TCPReset {
			return "reject with tcp reset"
		}
		return "reject"
	case VerdictStmt:
		return s.Verdict.String()
	}
	return fmt.Sprintf("unknown statement %T", s)
}

func affinityKeyString(f Family) string {
	return fmt.Sprintf("%s . %s . meta l4proto . th dport", addrFieldString(f, Saddr), addrFieldString(f, Daddr))
}

func familyOfKey(k KeyType) Family {
	if k == KeyAffinity6 {
		return IPv6
	}
	return IPv4
}

func ipName(f Family) string {
	if f == IPv6 {
		return "ip6"
	}
	return "ip"
}

// durationString prints seconds as nft prints timeouts: "3h", "1m30s".
func durationString(secs uint32) string {
	if secs == 0 {
		return "0s"
	}
	var b strings.Builder
	for _, u := range []struct {
		n    uint32
		name string
	}{{86400, "d"}, {3600, "h"}, {60, "m"}, {1, "s"}} {
		if secs >= u.n {
			fmt.Fprintf(&b, "%d%s", secs/u.n, u.name)
			secs %= u.n
		}
	}
	return b.String()
}

func vmapKeyString(k KeyType) string {
	switch k {
	case KeyAddr4ProtoPort:
		return "ip daddr . meta l4proto . th dport"
	case KeyAddr6ProtoPort:
		return "ip6 daddr . meta l4proto . th dport"
	case KeyProtoPort:
		return "meta l4proto . th dport"
	}
	return "invalid"
}
