package dataplane

import (
	"fmt"
	"net/netip"
	"reflect"
	"slices"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// Hook priorities. DNAT runs at dstnat; the reject checks run just before
// it (so they see the original destination of a packet that will not be
// DNATed) and, for locally generated packets, just after it (so only
// packets left on a ClusterIP are rejected); masquerade runs at srcnat.
const (
	priorityDstNAT     int32 = -100
	prioritySrcNAT     int32 = 100
	priorityFilterPre  int32 = priorityDstNAT - 10
	priorityFilterPost int32 = priorityDstNAT + 10
)

// affinityMapSize caps the entries (client and frontend pairs) of each
// affinity map. A full map only costs new clients their stickiness: the
// update after DNAT fails for them, and each of their connections draws
// an endpoint anew.
const affinityMapSize = 1 << 20

// settings is what the whole table depends on beyond single Services: the
// parsed ProxyConfig and the node. When it changes, every Service is
// computed again.
type settings struct {
	nodeName string
	nodeZone string
	markBit  uint32
	masqAll  bool
	// localCIDRs per family: sources inside are pods (no masquerade to a
	// ClusterIP); nil means no source counts as outside.
	localCIDRs    map[Family]netip.Prefix
	localIfPrefix string
	nodePortIPs   map[Family][]netip.Addr
	// nodeAddrs are all of the node's addresses, by family.
	nodeAddrs     map[Family][]netip.Addr
	allowedExtIPs []netip.Prefix
	problems      []string
}

func newSettings(snap *Snapshot) *settings {
	cfg := snap.Config
	s := &settings{
		nodeName:    snap.NodeName,
		nodeZone:    snap.NodeZone,
		markBit:     1 << proxyv1alpha1.DefaultMasqueradeBit,
		masqAll:     cfg.MasqueradeAll,
		localCIDRs:  map[Family]netip.Prefix{},
		nodePortIPs: map[Family][]netip.Addr{},
		nodeAddrs:   map[Family][]netip.Addr{},
	}
	if cfg.MasqueradeBit != nil && *cfg.MasqueradeBit >= 0 && *cfg.MasqueradeBit <= 31 {
		s.markBit = 1 << uint32(*cfg.MasqueradeBit)
	}

	mode := proxyv1alpha1.DetectLocalByClusterCIDR
	if cfg.LocalTrafficDetection != nil && cfg.LocalTrafficDetection.Mode != "" {
		mode = cfg.LocalTrafficDetection.Mode
	}
	switch mode {
	case proxyv1alpha1.DetectLocalByClusterCIDR:
		for _, p := range s.parseCIDRs("spec.clusterCIDRs", cfg.ClusterCIDRs) {
			s.localCIDRs[familyOf(p.Addr())] = p
		}
	case proxyv1alpha1.DetectLocalByNodeCIDR:
		for _, p := range snap.NodePodCIDRs {
			if _, seen := s.localCIDRs[familyOf(p.Addr())]; !seen && p.IsValid() {
				s.localCIDRs[familyOf(p.Addr())] = p.Masked()
			}
		}
	case proxyv1alpha1.DetectLocalByInterfaceNamePrefix:
		s.localIfPrefix = cfg.LocalTrafficDetection.InterfaceNamePrefix
	default:
		s.problems = append(s.problems, fmt.Sprintf("spec.localTrafficDetection.mode: unknown mode %q; no source counts as outside the cluster", mode))
	}

	nodePortCIDRs := s.parseCIDRs("spec.nodePortAddresses", cfg.NodePortAddresses)
	for _, a := range snap.NodeAddresses {
		a = a.Unmap()
		if !a.IsValid() {
			continue
		}
		s.nodeAddrs[familyOf(a)] = append(s.nodeAddrs[familyOf(a)], a)
		if nodePortAddressAllowed(a, nodePortCIDRs, len(cfg.NodePortAddresses) > 0) {
			s.nodePortIPs[familyOf(a)] = append(s.nodePortIPs[familyOf(a)], a)
		}
	}
	for _, m := range []map[Family][]netip.Addr{s.nodePortIPs, s.nodeAddrs} {
		for f := range m {
			slices.SortFunc(m[f], netip.Addr.Compare)
			m[f] = slices.Compact(m[f])
		}
	}
	s.allowedExtIPs = s.parseCIDRs("spec.allowedExternalIPCIDRs", cfg.AllowedExternalIPCIDRs)
	return s
}

// nodePortAddressAllowed says whether NodePorts are served on a: inside one
// of the configured CIDRs, or, with none configured, any address but
// loopback and link-local ones.
func nodePortAddressAllowed(a netip.Addr, cidrs []netip.Prefix, configured bool) bool {
	if !configured {
		return !a.IsLoopback() && !a.IsLinkLocalUnicast()
	}
	for _, p := range cidrs {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

func (s *settings) parseCIDRs(field string, cidrs []proxyv1alpha1.CIDR) []netip.Prefix {
	var out []netip.Prefix
	for i, c := range cidrs {
		p, err := netip.ParsePrefix(string(c))
		if err != nil {
			s.problems = append(s.problems, fmt.Sprintf("%s[%d]: %q is not a CIDR; ignored", field, i, c))
			continue
		}
		out = append(out, p.Masked())
	}
	return out
}

// localMatch matches traffic from pods by the local traffic detection;
// nil when nothing is detected as local.
func (s *settings) localMatch(f Family) Stmt {
	switch {
	case s.localIfPrefix != "":
		return MatchIifnamePrefix{Prefix: s.localIfPrefix}
	case s.localCIDRs[f].IsValid():
		return MatchAddr{Field: Saddr, Prefix: s.localCIDRs[f]}
	}
	return nil
}

// notLocalMatch matches traffic not from pods; only when localMatch is
// not nil.
func (s *settings) notLocalMatch(f Family) Stmt {
	if s.localIfPrefix != "" {
		return MatchIifnamePrefix{Prefix: s.localIfPrefix, Negate: true}
	}
	return MatchAddr{Field: Saddr, Prefix: s.localCIDRs[f], Negate: true}
}

func (s *settings) equal(o *settings) bool { return o != nil && reflect.DeepEqual(s, o) }

func (s *settings) externalIPAllowed(a netip.Addr) bool {
	if len(s.allowedExtIPs) == 0 {
		return true
	}
	for _, p := range s.allowedExtIPs {
		if p.Contains(a) {
			return true
		}
	}
	return false
}

// buildBase returns the fixed part of the table: hooked chains, the
// dispatch chains that look packets up in the maps, and the declarations
// of those maps and sets.
func buildBase(s *settings) *Base {
	b := &Base{}
	var services, svcCheck, nodePortCheck, clusterIPsCheck, firewallCheck, hairpin, affinityRecord []Rule
	for _, f := range Families {
		addrKey, addrProtoPortKey, pairKey, endpointData := KeyAddr4, KeyAddr4ProtoPort, KeyAddr4Pair, DataEndpoint4
		affinityKey, firewallKey := KeyAffinity4, KeyFirewall4
		if f == IPv6 {
			addrKey, addrProtoPortKey, pairKey, endpointData = KeyAddr6, KeyAddr6ProtoPort, KeyAddr6Pair, DataEndpoint6
			affinityKey, firewallKey = KeyAffinity6, KeyFirewall6
		}
		nodePortIPs := &Set{Name: familySet(setNodePortIPs, f), Key: addrKey, Comment: "node addresses NodePorts are served on"}
		for _, a := range s.nodePortIPs[f] {
			nodePortIPs.Elements = append(nodePortIPs.Elements, Element{Set: nodePortIPs.Name, Key: Key{Addr: a}})
		}
		b.Sets = append(b.Sets,
			&Set{Name: familySet(setServiceIPs, f), Key: addrProtoPortKey, Data: DataVerdict, Comment: "ClusterIP, externalIP and LoadBalancer IP frontends"},
			&Set{Name: familySet(setServiceNodePorts, f), Key: KeyProtoPort, Data: DataVerdict, Comment: "NodePort frontends"},
			nodePortIPs,
			&Set{Name: familySet(setNoEndpointServices, f), Key: addrProtoPortKey, Data: DataVerdict, Comment: "frontends without usable endpoints"},
			&Set{Name: familySet(setNoEndpointNodePorts, f), Key: KeyProtoPort, Data: DataVerdict, Comment: "NodePorts without usable endpoints"},
			&Set{Name: familySet(setClusterIPs, f), Key: addrKey, Comment: "ClusterIPs: ports they do not serve are rejected"},
			&Set{Name: familySet(setHairpin, f), Key: pairKey, Comment: "endpoint to itself: hairpin traffic, masqueraded"},
			&Set{Name: familySet(setFirewallIPs, f), Key: addrProtoPortKey, Comment: "LoadBalancer frontends with loadBalancerSourceRanges"},
			&Set{Name: familySet(setFirewallAllow, f), Key: firewallKey, Flags: SetInterval, Comment: "sources each of those frontends admits"},
		)
		b.Sets = append(b.Sets,
			&Set{Name: familySet(setAffinityFrontends, f), Key: addrProtoPortKey, Data: DataVerdict, Comment: "frontends with session affinity: where their new connections are recorded"},
			&Set{Name: familySet(setAffinityNodePorts, f), Key: KeyProtoPort, Data: DataVerdict, Comment: "NodePorts with session affinity: where their new connections are recorded"},
		)
		for shard := range uint32(affinityMapShards) {
			b.Sets = append(b.Sets, &Set{Name: affinityShardName(f, shard), Key: affinityKey, Data: endpointData, Flags: SetDynamic,
				Size: affinityMapSize, Comment: "session affinity: client . frontend to endpoint, refreshed by each new connection"})
		}
		for shard := range uint32(endpointMapShards) {
			b.Sets = append(b.Sets, &Set{Name: endpointShardName(f, shard), Key: KeyIndex, Data: endpointData,
				Comment: "endpoints of Service ports, a run of indexes each"})
		}
		hairpin = append(hairpin, Rule{Stmts: []Stmt{MatchAddrPairSet{Family: f, Set: familySet(setHairpin, f)}, Masquerade{}}, Comment: "hairpin"})
		onNodePortIP := MatchAddrSet{Field: Daddr, Family: f, Set: familySet(setNodePortIPs, f)}
		services = append(services,
			Rule{Stmts: []Stmt{VmapLookup{Key: addrProtoPortKey, Map: familySet(setServiceIPs, f)}}},
			Rule{Stmts: []Stmt{onNodePortIP, VmapLookup{Key: KeyProtoPort, Map: familySet(setServiceNodePorts, f)}}},
		)
		svcCheck = append(svcCheck, Rule{Stmts: []Stmt{VmapLookup{Key: addrProtoPortKey, Map: familySet(setNoEndpointServices, f)}}})
		nodePortCheck = append(nodePortCheck, Rule{Stmts: []Stmt{onNodePortIP, VmapLookup{Key: KeyProtoPort, Map: familySet(setNoEndpointNodePorts, f)}}})
		firewallCheck = append(firewallCheck, Rule{Stmts: []Stmt{
			MatchFrontendSet{Family: f, Set: familySet(setFirewallIPs, f)},
			MatchFirewallAllowed{Family: f, Set: familySet(setFirewallAllow, f), Negate: true},
			VerdictStmt{Verdict{Kind: VerdictDrop}},
		}, Comment: "loadBalancerSourceRanges"})
		// nft needs the protocol matched to know the ports' size, so one
		// rule per protocol; a frontend's element goes to its map's update
		// chain (the first that matches: a goto).
		for _, proto := range []Protocol{TCP, UDP, SCTP} {
			affinityRecord = append(affinityRecord,
				Rule{Stmts: []Stmt{MatchL4Proto{proto}, CtFrontendVmap{Family: f, Key: addrProtoPortKey, Map: familySet(setAffinityFrontends, f)}}},
				Rule{Stmts: []Stmt{MatchL4Proto{proto}, MatchCtOriginalDaddrSet{Family: f, Set: familySet(setNodePortIPs, f)},
					CtFrontendVmap{Family: f, Key: KeyProtoPort, Map: familySet(setAffinityNodePorts, f)}}},
			)
		}
		clusterIPsCheck = append(clusterIPsCheck, Rule{Stmts: []Stmt{
			MatchAddrSet{Field: Daddr, Family: f, Set: familySet(setClusterIPs, f)},
			VerdictStmt{Goto(chainRejectPacket)},
		}})
	}

	newOnly := func(chain string) Rule {
		return Rule{Stmts: []Stmt{MatchCtStateNew{}, VerdictStmt{Jump(chain)}}}
	}
	jump := func(chain string) Rule { return Rule{Stmts: []Stmt{VerdictStmt{Jump(chain)}}} }
	// Session affinity is recorded after DNAT, when the connection's
	// conntrack entry holds both the frontend and the endpoint: where a
	// new connection leaves the nat hooks (forward or input for arriving
	// packets, output after DNAT for the node's own).
	recordAffinity := Rule{Stmts: []Stmt{MatchCtStateNew{}, MatchCtStatusDNAT{}, VerdictStmt{Jump(chainAffinityRecord)}}}
	b.Chains = []*Chain{
		{Name: chainNATPrerouting, Hook: &Hook{ChainNAT, HookPrerouting, priorityDstNAT}, Rules: []Rule{jump(chainServices)}},
		{Name: chainNATOutput, Hook: &Hook{ChainNAT, HookOutput, priorityDstNAT}, Rules: []Rule{jump(chainServices)}},
		{Name: chainNATPostrouting, Hook: &Hook{ChainNAT, HookPostrouting, prioritySrcNAT}, Rules: []Rule{jump(chainMasquerading)}},
		{Name: chainFilterPrerouting, Hook: &Hook{ChainFilter, HookPrerouting, priorityFilterPre}, Rules: []Rule{
			newOnly(chainFirewallCheck)}},
		{Name: chainFilterInput, Hook: &Hook{ChainFilter, HookInput, priorityFilterPre}, Rules: []Rule{
			newOnly(chainNodePortEndpointsCheck), newOnly(chainServiceEndpointsCheck), recordAffinity}},
		{Name: chainFilterForward, Hook: &Hook{ChainFilter, HookForward, priorityFilterPre}, Rules: []Rule{
			newOnly(chainServiceEndpointsCheck), newOnly(chainClusterIPsCheck), recordAffinity}},
		{Name: chainFilterOutput, Hook: &Hook{ChainFilter, HookOutput, priorityFilterPre}, Rules: []Rule{
			newOnly(chainFirewallCheck)}},
		{Name: chainFilterOutputPostDNAT, Hook: &Hook{ChainFilter, HookOutput, priorityFilterPost}, Rules: []Rule{
			newOnly(chainServiceEndpointsCheck), newOnly(chainClusterIPsCheck), recordAffinity}},
		{Name: chainServices, Rules: services},
		{Name: chainServiceEndpointsCheck, Rules: svcCheck},
		{Name: chainNodePortEndpointsCheck, Rules: nodePortCheck},
		{Name: chainClusterIPsCheck, Rules: clusterIPsCheck},
		{Name: chainFirewallCheck, Rules: firewallCheck},
		{Name: chainMasquerading, Rules: append(hairpin,
			Rule{Stmts: []Stmt{MatchMarkUnset{s.markBit}, VerdictStmt{Verdict{Kind: VerdictReturn}}}},
			Rule{Stmts: []Stmt{ClearMarkBits{s.markBit}}},
			Rule{Stmts: []Stmt{Masquerade{}}},
		)},
		{Name: chainAffinityRecord, Rules: affinityRecord},
		{Name: chainRejectPacket, Rules: []Rule{
			{Stmts: []Stmt{MatchL4Proto{TCP}, Reject{TCPReset: true}}},
			{Stmts: []Stmt{Reject{}}},
		}},
	}
	return b
}

// affinityUpdateChain is the shared chain that records a new connection
// in an affinity map with a timeout, one rule per protocol (nft needs the
// protocol to know the ports' size).
func affinityUpdateChain(u affinityUpdate) *Chain {
	c := &Chain{Name: u.chain()}
	for _, proto := range []Protocol{TCP, UDP, SCTP} {
		c.Rules = append(c.Rules, Rule{Stmts: []Stmt{MatchL4Proto{proto}, RecordAffinity{Family: u.family, Set: u.set, Timeout: u.timeout}}})
	}
	return c
}
