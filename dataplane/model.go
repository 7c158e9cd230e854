package dataplane

import (
	"net/netip"

	"k8s.io/apimachinery/pkg/types"
)

// TableName is the one nftables table nftproxy owns, in the inet family so
// that one table serves IPv4 and IPv6. Nothing outside it is ever touched.
const TableName = "nftproxy"

// Family is an IP family; every address-keyed set, map and chain exists
// once per family because nftables keys have a fixed width.
type Family uint8

const (
	IPv4 Family = 4
	IPv6 Family = 6
)

// Families lists both, in the order the ruleset is written.
var Families = []Family{IPv4, IPv6}

func familyOf(a netip.Addr) Family {
	if a.Is4() {
		return IPv4
	}
	return IPv6
}

// Suffix is how a family appears in set and chain names: "4" or "6".
func (f Family) Suffix() string {
	if f == IPv4 {
		return "4"
	}
	return "6"
}

// Protocol is an L4 protocol number as nftables' meta l4proto sees it.
type Protocol uint8

const (
	TCP  Protocol = 6
	UDP  Protocol = 17
	SCTP Protocol = 132
)

func (p Protocol) String() string {
	switch p {
	case TCP:
		return "tcp"
	case UDP:
		return "udp"
	case SCTP:
		return "sctp"
	}
	return "unknown"
}

// Ruleset is the desired content of our table: the static part and one
// fragment per Service. Fragments are shared between successive Rulesets
// while their Service does not change, so the diff of two Rulesets costs
// a pointer comparison per unchanged Service. A Ruleset must not be
// modified once built.
type Ruleset struct {
	Base     *Base
	Services map[types.NamespacedName]*ServiceRules
	// Shared are chains that exist while some Service needs them: one per
	// affinity map and timeout in use, which records the endpoint of each
	// new connection to a frontend with that timeout (sorted by name).
	Shared []*Chain

	// generation identifies this Ruleset; a Computer's result also names
	// the generation it was derived from and the Services that differ, so
	// diffing against that one costs only those Services.
	generation, derivedFrom uint64
	changed                 []types.NamespacedName
}

// Base is the part of the table that does not come from any one Service:
// hooked chains, helper chains, and the set and map declarations (with the
// elements derived from the node and the config, such as NodePort addresses).
type Base struct {
	Sets   []*Set
	Chains []*Chain
	// problems are the config's parts that could not be used.
	problems []string
}

// ServiceRules is everything one Service contributes: its chains, its map
// and set elements, and what could not be programmed and why.
type ServiceRules struct {
	Chains   []*Chain
	Elements []Element
	// Problems name the parts of the Service that were skipped (a
	// malformed address, an unknown protocol, a frontend another Service
	// holds); the rest of the Service is programmed.
	Problems []string
	// Ports summarise what each Service port in each family was
	// programmed with, for the agent: metrics, health checks and conntrack
	// cleanup read them instead of re-deriving the Service's semantics.
	Ports []PortSummary
	// HealthCheckNodePort is the Service's spec.healthCheckNodePort when
	// this node must answer health checks for it (a LoadBalancer Service
	// with externalTrafficPolicy Local), else 0.
	HealthCheckNodePort uint16
}

// PortSummary is one Service port in one family as programmed.
type PortSummary struct {
	Family Family
	Proto  Protocol
	// Frontends are the Service's addresses with this port: the ClusterIP,
	// then externalIPs and LoadBalancer IPs, whether or not another Service
	// holds them too.
	Frontends []netip.AddrPort
	// NodePort is the port's NodePort, 0 if none.
	NodePort uint16
	// Endpoints are every endpoint traffic to this port may be sent to.
	Endpoints []netip.AddrPort
	// LocalEndpoints counts the ready endpoints on this node; the
	// serving terminating ones the rules fall back to do not count.
	LocalEndpoints int
	// AffinityTimeout is the ClientIP session affinity timeout in
	// seconds, 0 without affinity.
	AffinityTimeout uint32
}

// LocalEndpoints is the Service's count of ready endpoints on this node:
// the most over its ports and families, as health checks report it (0, a
// failing check, when all of them are terminating).
func (r *ServiceRules) LocalEndpoints() int {
	n := 0
	for _, p := range r.Ports {
		n = max(n, p.LocalEndpoints)
	}
	return n
}

// Set declares a named set or map of the table.
type Set struct {
	Name  string
	Key   KeyType
	Data  DataType // DataNone for a plain set
	Flags SetFlags
	// Size caps the elements of a dynamic set (0: the kernel's default,
	// which is 65535 for sets the packet path fills).
	Size    uint32
	Comment string
	// Elements are the static ones, for sets of the Base.
	Elements []Element
}

// SetFlags are the nftables set flags nftproxy uses.
type SetFlags uint8

const (
	// SetInterval: the key's last field is a prefix (elements are ranges).
	SetInterval SetFlags = 1 << iota
	// SetDynamic: the packet path adds and refreshes elements, each with
	// its own timeout; the control plane never writes them.
	SetDynamic
)

// KeyType is the shape of a set's key.
type KeyType uint8

const (
	// KeyAddr4 and KeyAddr6: an address (ipv4_addr, ipv6_addr).
	KeyAddr4 KeyType = iota + 1
	KeyAddr6
	// KeyAddr4ProtoPort and KeyAddr6ProtoPort: destination address,
	// l4 protocol, destination port (a Service frontend on an IP).
	KeyAddr4ProtoPort
	KeyAddr6ProtoPort
	// KeyProtoPort: l4 protocol and destination port (a NodePort).
	KeyProtoPort
	// KeyIndex: a number drawn by numgen, indexing the endpoint maps.
	KeyIndex
	// KeyAddr4Pair and KeyAddr6Pair: source and destination address.
	KeyAddr4Pair
	KeyAddr6Pair
	// KeyAffinity4 and KeyAffinity6: client address, frontend address,
	// l4 protocol, frontend port (the session affinity maps: a client's
	// endpoint for one frontend).
	KeyAffinity4
	KeyAffinity6
	// KeyFirewall4 and KeyFirewall6: LoadBalancer IP, l4 protocol, port,
	// source prefix (the allowed sources of loadBalancerSourceRanges).
	KeyFirewall4
	KeyFirewall6
)

// DataType is what a map maps to.
type DataType uint8

const (
	DataNone DataType = iota
	DataVerdict
	// DataEndpoint4 and DataEndpoint6: an address and port to DNAT to.
	DataEndpoint4
	DataEndpoint6
)

// Element is one member of a set or map.
type Element struct {
	Set     string
	Key     Key
	Verdict Verdict        // for verdict maps
	Target  netip.AddrPort // for endpoint maps
	Comment string
}

// Key holds the fields of an element's key; which are used depends on the
// set's KeyType.
type Key struct {
	Addr  netip.Addr
	Addr2 netip.Addr // the second address of a pair
	Proto Protocol
	Port  uint16
	Index uint32
	// Source is the source range of a firewall element.
	Source netip.Prefix
}

// VerdictKind is what a verdict does.
type VerdictKind uint8

const (
	VerdictNone VerdictKind = iota
	VerdictAccept
	VerdictDrop
	VerdictReturn
	VerdictJump
	VerdictGoto
)

// Verdict ends a rule or is the value of a verdict map element.
type Verdict struct {
	Kind  VerdictKind
	Chain string // for jump and goto
}

// Goto and Jump build verdicts to a chain.
func Goto(chain string) Verdict { return Verdict{Kind: VerdictGoto, Chain: chain} }
func Jump(chain string) Verdict { return Verdict{Kind: VerdictJump, Chain: chain} }

// Chain is a chain of the table. Hook is set for base chains only.
type Chain struct {
	Name  string
	Hook  *Hook
	Rules []Rule
}

// Hook attaches a base chain to a netfilter hook.
type Hook struct {
	Type     ChainType
	Hook     HookPoint
	Priority int32
}

// ChainType is nftables' chain type.
type ChainType string

const (
	ChainNAT    ChainType = "nat"
	ChainFilter ChainType = "filter"
)

// HookPoint is a netfilter hook.
type HookPoint string

const (
	HookPrerouting  HookPoint = "prerouting"
	HookInput       HookPoint = "input"
	HookForward     HookPoint = "forward"
	HookOutput      HookPoint = "output"
	HookPostrouting HookPoint = "postrouting"
)

// Rule is a sequence of statements evaluated left to right; matches stop
// the rule when they fail.
type Rule struct {
	Stmts   []Stmt
	Comment string
}

// Stmt is one statement of a rule. The concrete types below are the whole
// vocabulary nftproxy writes; each is printed as nft prints it (text.go),
// encoded as netlink expressions (exprs.go) and evaluated by the tests'
// packet tracer.
type Stmt interface{ isStmt() }

// AddrField names the source or destination address of a packet.
type AddrField uint8

const (
	Saddr AddrField = iota
	Daddr
)

// MatchCtStateNew matches packets that start a connection.
type MatchCtStateNew struct{}

// MatchAddr matches an address field against a prefix (a single address
// when the prefix is a full-length one).
type MatchAddr struct {
	Field  AddrField
	Prefix netip.Prefix
	Negate bool
}

// MatchAddrSet matches an address field against a named set of addresses.
type MatchAddrSet struct {
	Field  AddrField
	Family Family
	Set    string
}

// MatchIifnamePrefix matches (or, negated, excludes) input interfaces by
// name prefix.
type MatchIifnamePrefix struct {
	Prefix string
	Negate bool
}

// MatchL4Proto matches the transport protocol.
type MatchL4Proto struct{ Proto Protocol }

// MatchMarkUnset matches packets whose mark has none of the bits of Mask.
type MatchMarkUnset struct{ Mask uint32 }

// VmapLookup looks the packet up in a named verdict map and takes the
// verdict found; a miss continues with the next rule.
type VmapLookup struct {
	Key KeyType
	Map string
}

// MatchFibSaddrLocal matches packets whose source address is one of the
// node's own (fib saddr type local): traffic the node itself sends.
type MatchFibSaddrLocal struct{}

// MatchFrontendSet matches destination address, l4 protocol and
// destination port against a named set of frontends.
type MatchFrontendSet struct {
	Family Family
	Set    string
}

// MatchFirewallAllowed matches (destination address, l4 protocol,
// destination port, source address) against a named interval set of
// allowed sources; Negate matches the packets the set does not allow.
type MatchFirewallAllowed struct {
	Family Family
	Set    string
	Negate bool
}

// RecordAffinity records, after DNAT, the endpoint a new connection was
// sent to as its client's endpoint for its frontend, all read from the
// connection's conntrack entry: client, frontend, l4 protocol and
// frontend port from the original direction, the endpoint (address and
// port) from the reply direction. The entry expires Timeout seconds from
// now; an entry that exists keeps its endpoint (the kernel only refreshes
// its timeout). A rule holding it must match the l4 protocol first: nft
// needs it to know the size of the ports.
type RecordAffinity struct {
	Family  Family
	Set     string
	Timeout uint32
}

// DNATAffinity DNATs to the endpoint the affinity map holds for the
// client and the packet's frontend; a miss ends the rule.
type DNATAffinity struct {
	Family Family
	Set    string
}

// MatchCtStatusDNAT matches packets of connections whose destination was
// NATed (ct status dnat): after the nat hook, the DNATed ones.
type MatchCtStatusDNAT struct{}

// MatchCtOriginalDaddrSet matches the original destination address of the
// packet's connection (before DNAT) against a named set of addresses.
type MatchCtOriginalDaddrSet struct {
	Family Family
	Set    string
}

// CtFrontendVmap looks the original frontend of the packet's connection
// up in a named verdict map: ct original daddr, ct protocol and ct
// original proto-dst for Key KeyAddr{4,6}ProtoPort, the last two for
// KeyProtoPort (a NodePort). Like RecordAffinity, it needs the l4
// protocol matched first in its rule. A miss continues with the next rule.
type CtFrontendVmap struct {
	Family Family
	Key    KeyType
	Map    string
}

// MatchAddrPairSet matches (source address, destination address) against
// a named set of pairs.
type MatchAddrPairSet struct {
	Family Family
	Set    string
}

// DNATRandom DNATs to an endpoint drawn at random: numgen random mod
// Count, plus Offset, indexes the family's endpoint map, whose elements
// Offset..Offset+Count-1 are this Service port's endpoints. One map for
// all Services keeps the kernel's per-transaction work flat (the kernel
// looks sets up by walking a list, so a set per Service would make every
// write cost time in proportion to the number of Services).
type DNATRandom struct {
	Family Family
	Count  uint32
	Offset uint32
	Map    string
}

// SetMarkBits ORs Bits into the packet mark.
type SetMarkBits struct{ Bits uint32 }

// ClearMarkBits XORs Bits out of the packet mark; only used after
// MatchMarkUnset has proven they are set.
type ClearMarkBits struct{ Bits uint32 }

// Masquerade source-NATs to the address of the outgoing interface.
type Masquerade struct{}

// Reject answers with a TCP reset (TCP) or ICMP port unreachable.
type Reject struct{ TCPReset bool }

// VerdictStmt ends the rule with a verdict.
type VerdictStmt struct{ Verdict Verdict }

func (MatchCtStateNew) isStmt()         {}
func (MatchAddr) isStmt()               {}
func (MatchAddrSet) isStmt()            {}
func (MatchIifnamePrefix) isStmt()      {}
func (MatchL4Proto) isStmt()            {}
func (MatchMarkUnset) isStmt()          {}
func (VmapLookup) isStmt()              {}
func (MatchAddrPairSet) isStmt()        {}
func (MatchFibSaddrLocal) isStmt()      {}
func (MatchFrontendSet) isStmt()        {}
func (MatchFirewallAllowed) isStmt()    {}
func (RecordAffinity) isStmt()          {}
func (DNATAffinity) isStmt()            {}
func (MatchCtStatusDNAT) isStmt()       {}
func (MatchCtOriginalDaddrSet) isStmt() {}
func (CtFrontendVmap) isStmt()          {}
func (DNATRandom) isStmt()              {}
func (SetMarkBits) isStmt()             {}
func (ClearMarkBits) isStmt()           {}
func (Masquerade) isStmt()              {}
func (Reject) isStmt()                  {}
func (VerdictStmt) isStmt()             {}
