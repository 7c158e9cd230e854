package dataplane

import (
	"cmp"
	"fmt"
	"maps"
	"net/netip"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Labels that take a Service away from nftproxy.
const (
	labelServiceProxyName = "service.kubernetes.io/service-proxy-name"
	labelHeadless         = "service.kubernetes.io/headless"
)

// claimRank orders competing claims on one frontend: an address the API
// server allocated (ClusterIP, NodePort) beats one a user wrote
// (externalIPs, LoadBalancer status), so a Service cannot hijack another's
// ClusterIP by listing it as an externalIP.
type claimRank uint8

const (
	rankAllocated claimRank = iota
	rankUserSupplied
)

// claim is an element a Service wants. Elements of different Services may
// collide (two Services listing one externalIP and port); group names the
// key space in which they collide, across the maps that share it.
type claim struct {
	Element
	group claimGroup
	rank  claimRank
	// frontend names the kind of frontend in a conflict report
	// ("externalIP"); empty for claims Services may share harmlessly
	// (membership of the ClusterIP and hairpin sets).
	frontend string
	// extra are elements that go with the frontend to whichever Service
	// wins it: the drop of a Local policy without local endpoints, the
	// firewall of loadBalancerSourceRanges.
	extra []Element
}

// claimGroup is a key space in which claims collide: the frontends on
// IPs (across the service and no-endpoint maps), NodePorts, and the
// shared sets, per family.
type claimGroup uint8

const (
	groupFrontends claimGroup = iota
	groupNodePorts
	groupClusterIPs
	groupHairpin
)

// in gives the group of family f.
func (g claimGroup) in(f Family) claimGroup {
	if f == IPv6 {
		return g + 8
	}
	return g
}

// describe names a claimed frontend: "externalIP 192.0.2.1 port 80/TCP".
func (c claim) describe() string {
	proto := strings.ToUpper(c.Key.Proto.String())
	if !c.Key.Addr.IsValid() {
		return fmt.Sprintf("%s %d/%s", c.frontend, c.Key.Port, proto)
	}
	return fmt.Sprintf("%s %s port %d/%s", c.frontend, c.Key.Addr, c.Key.Port, proto)
}

// fragment is what one Service computes to before its claims are weighed
// against other Services'.
type fragment struct {
	chains []*Chain
	claims []claim
	// owned are elements no other Service can want: its endpoint map
	// entries, at indexes allocated to it alone.
	owned    []Element
	problems []string
	ports    []PortSummary
	// healthCheckNodePort: see ServiceRules.
	healthCheckNodePort uint16
	// updates are the shared chains the fragment's affinity frontends
	// record their connections through (Ruleset.Shared).
	updates []affinityUpdate
}

// affinityUpdate names a shared chain that records new connections in an
// affinity map with a timeout.
type affinityUpdate struct {
	family  Family
	set     string
	timeout uint32
}

func (u affinityUpdate) chain() string { return affinityUpdateChainName(u.set, u.timeout) }

// indexSource hands a Service port's chain a run of n indexes in the
// endpoint map named endpointMap and returns the first.
type indexSource func(endpointMap, chain string, n int) uint32

// proxied says whether nftproxy handles the Service at all.
func proxied(svc *corev1.Service) bool {
	if svc == nil || svc.Spec.Type == corev1.ServiceTypeExternalName {
		return false
	}
	if svc.Spec.ClusterIP == corev1.ClusterIPNone || svc.Spec.ClusterIP == "" {
		return false
	}
	if _, ok := svc.Labels[labelHeadless]; ok {
		return false
	}
	if _, ok := svc.Labels[labelServiceProxyName]; ok {
		return false
	}
	return true
}

// endpoint is one backend of a Service port, as its slices describe it.
type endpoint struct {
	addr        netip.AddrPort
	ready       bool
	serving     bool
	terminating bool
	nodeName    string
	zoneHints   []string
	nodeHints   []string
}

// portEndpoints collects the endpoints of one Service port in one family
// from the Service's slices: the slice port with the Service port's name
// and protocol gives the number (targetPort by name is resolved here). An
// endpoint listed twice (slices overlap while the controller rewrites
// them) counts once, ready if any copy says so.
func portEndpoints(slicesOf []*discoveryv1.EndpointSlice, f Family, portName string, proto Protocol) []endpoint {
	byAddr := map[netip.AddrPort]*endpoint{}
	wantType := discoveryv1.AddressTypeIPv4
	if f == IPv6 {
		wantType = discoveryv1.AddressTypeIPv6
	}
	for _, sl := range slicesOf {
		if sl == nil || sl.AddressType != wantType {
			continue
		}
		var port int32
		for _, p := range sl.Ports {
			pProto, _ := parseProtocol(ptrValue(p.Protocol))
			if ptrValue(p.Name) == portName && pProto == proto && p.Port != nil {
				port = *p.Port
				break
			}
		}
		if port <= 0 || port > 65535 {
			continue
		}
		for _, e := range sl.Endpoints {
			if len(e.Addresses) == 0 {
				continue
			}
			a, err := netip.ParseAddr(e.Addresses[0])
			if err != nil || familyOf(a.Unmap()) != f || a.Zone() != "" {
				continue
			}
			ap := netip.AddrPortFrom(a.Unmap(), uint16(port))
			// Unknown readiness counts as ready, as the API asks of consumers.
			ready := e.Conditions.Ready == nil || *e.Conditions.Ready
			serving := ready
			if e.Conditions.Serving != nil {
				serving = *e.Conditions.Serving
			}
			ep := endpoint{addr: ap, ready: ready, serving: serving, terminating: ptrValue(e.Conditions.Terminating), nodeName: ptrValue(e.NodeName)}
			if e.Hints != nil {
				for _, z := range e.Hints.ForZones {
					ep.zoneHints = append(ep.zoneHints, z.Name)
				}
				for _, n := range e.Hints.ForNodes {
					ep.nodeHints = append(ep.nodeHints, n.Name)
				}
			}
			if old, ok := byAddr[ap]; ok {
				old.ready = old.ready || ep.ready
				old.serving = old.serving || ep.serving
				old.terminating = old.terminating && ep.terminating
				continue
			}
			byAddr[ap] = &ep
		}
	}
	out := make([]endpoint, 0, len(byAddr))
	for _, ep := range byAddr {
		out = append(out, *ep)
	}
	slices.SortFunc(out, func(a, b endpoint) int { return a.addr.Compare(b.addr) })
	return out
}

// usableEndpoints are the ready endpoints or, when none is ready, those
// still serving while they terminate, so a rollout does not fail
// connections.
func usableEndpoints(eps []endpoint) []endpoint {
	var ready, terminating []endpoint
	for _, ep := range eps {
		switch {
		case ep.ready:
			ready = append(ready, ep)
		case ep.serving && ep.terminating:
			terminating = append(terminating, ep)
		}
	}
	if len(ready) > 0 {
		return ready
	}
	return terminating
}

// clusterEndpoints are the endpoints Cluster traffic policy uses: the
// ready ones the topology prefers, or, with none ready, the serving
// terminating ones (as kube-proxy's CategorizeEndpoints).
func clusterEndpoints(eps []endpoint, s *settings) []endpoint {
	pick := topologyFilter(eps, s)
	var out []endpoint
	for _, ep := range eps {
		if ep.ready && pick(ep) {
			out = append(out, ep)
		}
	}
	if len(out) > 0 {
		return out
	}
	return usableEndpoints(eps)
}

// countReady counts the ready endpoints of eps: what the health check
// reports. The terminating endpoints the rules fall back to do not count,
// so a node whose local endpoints are all terminating fails its health
// check and load balancers drain it, while it still serves them what
// arrives meanwhile (KEP-1669, as kube-proxy's LocalReadyEndpoints).
func countReady(eps []endpoint) int {
	n := 0
	for _, ep := range eps {
		if ep.ready {
			n++
		}
	}
	return n
}

// localEndpoints are the usable endpoints on this node, the fallback to
// terminating ones decided among the local endpoints alone.
func localEndpoints(eps []endpoint, s *settings) []endpoint {
	var local []endpoint
	for _, ep := range eps {
		if ep.nodeName != "" && ep.nodeName == s.nodeName {
			local = append(local, ep)
		}
	}
	return usableEndpoints(local)
}

// topologyFilter says which ready endpoints topology-aware routing keeps,
// as kube-proxy decides it from the hints alone (the EndpointSlice
// controller writes them only for Services that ask, by
// trafficDistribution or the topology-mode annotation): when every ready
// endpoint has node hints and one names this node, those for this node;
// else when every ready endpoint has zone hints and one names this
// node's zone, those for the zone; else all.
func topologyFilter(eps []endpoint, s *settings) func(endpoint) bool {
	anyReady, allNode, forNode, allZone, forZone := false, true, false, true, false
	for _, ep := range eps {
		if !ep.ready {
			continue
		}
		anyReady = true
		allNode = allNode && len(ep.nodeHints) > 0
		forNode = forNode || slices.Contains(ep.nodeHints, s.nodeName) && s.nodeName != ""
		allZone = allZone && len(ep.zoneHints) > 0
		forZone = forZone || slices.Contains(ep.zoneHints, s.nodeZone) && s.nodeZone != ""
	}
	switch {
	case anyReady && allNode && forNode:
		return func(ep endpoint) bool { return slices.Contains(ep.nodeHints, s.nodeName) }
	case anyReady && allZone && forZone:
		return func(ep endpoint) bool { return slices.Contains(ep.zoneHints, s.nodeZone) }
	}
	return func(endpoint) bool { return true }
}

func ptrValue[T any](p *T) T {
	var zero T
	if p == nil {
		return zero
	}
	return *p
}

func parseProtocol(p corev1.Protocol) (Protocol, bool) {
	switch p {
	case corev1.ProtocolTCP, "":
		return TCP, true
	case corev1.ProtocolUDP:
		return UDP, true
	case corev1.ProtocolSCTP:
		return SCTP, true
	}
	return 0, false
}

// computeService turns one Service and its slices into its chains and
// claims. It never fails: what cannot be programmed is left out and named
// in the fragment's problems.
func computeService(key types.NamespacedName, st ServiceState, s *settings, indexes indexSource) *fragment {
	fr := &fragment{}
	svc := st.Service
	if !proxied(svc) {
		return fr
	}

	clusterIPs := map[Family]netip.Addr{}
	ips := svc.Spec.ClusterIPs
	if len(ips) == 0 {
		ips = []string{svc.Spec.ClusterIP}
	}
	for i, raw := range ips {
		a, err := netip.ParseAddr(raw)
		if err != nil || a.Zone() != "" {
			fr.problem("spec.clusterIPs[%d]: %q is not an IP address; skipped", i, raw)
			continue
		}
		a = a.Unmap()
		if _, dup := clusterIPs[familyOf(a)]; dup {
			fr.problem("spec.clusterIPs[%d]: a second %s ClusterIP; skipped", i, familyName(familyOf(a)))
			continue
		}
		clusterIPs[familyOf(a)] = a
	}

	external := map[Family][]externalAddr{}
	for i, raw := range svc.Spec.ExternalIPs {
		field := fmt.Sprintf("spec.externalIPs[%d]", i)
		a, ok := fr.externalAddr(field, raw, clusterIPs, s)
		if ok {
			external[familyOf(a)] = append(external[familyOf(a)], externalAddr{a, "externalIP"})
		}
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		for i, ing := range svc.Status.LoadBalancer.Ingress {
			if ing.IP == "" || (ing.IPMode != nil && *ing.IPMode == corev1.LoadBalancerIPModeProxy) {
				continue
			}
			field := fmt.Sprintf("status.loadBalancer.ingress[%d].ip", i)
			a, ok := fr.externalAddr(field, ing.IP, clusterIPs, nil)
			if ok {
				external[familyOf(a)] = append(external[familyOf(a)], externalAddr{a, kindLoadBalancerIP})
			}
		}
	}

	type validPort struct {
		corev1.ServicePort
		proto Protocol
	}
	var ports []validPort
	seenPorts := map[validPort]bool{}
	for i, port := range svc.Spec.Ports {
		proto, ok := parseProtocol(port.Protocol)
		id := validPort{corev1.ServicePort{Port: port.Port}, proto}
		switch {
		case !ok:
			fr.problem("spec.ports[%d].protocol: unknown protocol %q; port skipped", i, port.Protocol)
		case port.Port <= 0 || port.Port > 65535:
			fr.problem("spec.ports[%d].port: %d is not a port number; port skipped", i, port.Port)
		case seenPorts[id]:
			fr.problem("spec.ports[%d]: port %d/%s is listed twice; skipped", i, port.Port, proto)
		default:
			seenPorts[id] = true
			ports = append(ports, validPort{port, proto})
		}
	}

	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer && svc.Spec.ExternalTrafficPolicy == corev1.ServiceExternalTrafficPolicyLocal &&
		svc.Spec.HealthCheckNodePort > 0 && svc.Spec.HealthCheckNodePort <= 65535 {
		fr.healthCheckNodePort = uint16(svc.Spec.HealthCheckNodePort)
	}

	pol := fr.parsePolicy(svc)
	clusterIPComment := key.Namespace + "/" + key.Name
	for _, f := range Families {
		vip, ok := clusterIPs[f]
		if !ok {
			continue
		}
		fr.claims = append(fr.claims, claim{
			Element: Element{Set: familySet(setClusterIPs, f), Key: Key{Addr: vip}, Comment: clusterIPComment},
			group:   groupClusterIPs.in(f), rank: rankAllocated,
		})
		for _, port := range ports {
			fr.addServicePort(key, f, vip, external[f], port.ServicePort, port.proto, st.Slices, s, indexes, pol)
		}
	}
	slices.SortFunc(fr.chains, func(a, b *Chain) int { return cmp.Compare(a.Name, b.Name) })
	return fr
}

type externalAddr struct {
	addr netip.Addr
	kind string // "externalIP" or "LoadBalancer IP"
}

// externalAddr parses an externalIP or LoadBalancer IP, checking that the
// Service has a ClusterIP of its family and, for externalIPs (s non-nil),
// that the config allows it.
func (fr *fragment) externalAddr(field, raw string, clusterIPs map[Family]netip.Addr, s *settings) (netip.Addr, bool) {
	a, err := netip.ParseAddr(raw)
	if err != nil || a.Zone() != "" {
		fr.problem("%s: %q is not an IP address; skipped", field, raw)
		return netip.Addr{}, false
	}
	a = a.Unmap()
	if _, ok := clusterIPs[familyOf(a)]; !ok {
		fr.problem("%s: %s is %s but the Service has no %s ClusterIP; skipped", field, a, familyName(familyOf(a)), familyName(familyOf(a)))
		return netip.Addr{}, false
	}
	if s != nil && !s.externalIPAllowed(a) {
		fr.problem("%s: %s is outside allowedExternalIPCIDRs; skipped", field, a)
		return netip.Addr{}, false
	}
	return a, true
}

func familyName(f Family) string {
	if f == IPv4 {
		return "IPv4"
	}
	return "IPv6"
}

func (fr *fragment) problem(format string, args ...any) {
	fr.problems = append(fr.problems, fmt.Sprintf(format, args...))
}

// Session affinity limits, as the API defines them.
const (
	defaultAffinityTimeout = 10800
	maxAffinityTimeout     = 86400
)

// annotationSourceRanges is the beta annotation kube-proxy reads when
// spec.loadBalancerSourceRanges is empty.
const annotationSourceRanges = "service.beta.kubernetes.io/load-balancer-source-ranges"

// policy is what a Service's traffic policies, affinity and source
// ranges ask of each of its ports.
type policy struct {
	internalLocal, externalLocal bool
	// affinity is the ClientIP affinity timeout in seconds; 0 for none.
	affinity uint32
	// sourceRanges are the valid loadBalancerSourceRanges; filtered is
	// whether any were given (then a family without ranges admits no
	// source).
	sourceRanges []netip.Prefix
	filtered     bool
}

// parsePolicy reads the Service's policies, reporting values it cannot
// use and what it does instead.
func (fr *fragment) parsePolicy(svc *corev1.Service) policy {
	var pol policy
	switch p := ptrValue(svc.Spec.InternalTrafficPolicy); p {
	case "", corev1.ServiceInternalTrafficPolicyCluster:
	case corev1.ServiceInternalTrafficPolicyLocal:
		pol.internalLocal = true
	default:
		fr.problem("spec.internalTrafficPolicy: unknown policy %q; using Cluster", p)
	}
	switch p := svc.Spec.ExternalTrafficPolicy; p {
	case "", corev1.ServiceExternalTrafficPolicyCluster:
	case corev1.ServiceExternalTrafficPolicyLocal:
		pol.externalLocal = true
	default:
		fr.problem("spec.externalTrafficPolicy: unknown policy %q; using Cluster", p)
	}
	switch svc.Spec.SessionAffinity {
	case "", corev1.ServiceAffinityNone:
	case corev1.ServiceAffinityClientIP:
		pol.affinity = defaultAffinityTimeout
		if c := svc.Spec.SessionAffinityConfig; c != nil && c.ClientIP != nil && c.ClientIP.TimeoutSeconds != nil {
			if t := *c.ClientIP.TimeoutSeconds; t >= 1 && t <= maxAffinityTimeout {
				pol.affinity = uint32(t)
			} else {
				fr.problem("spec.sessionAffinityConfig.clientIP.timeoutSeconds: %d is outside 1..%d; using %d", t, maxAffinityTimeout, defaultAffinityTimeout)
			}
		}
	default:
		fr.problem("spec.sessionAffinity: unknown value %q; no affinity", svc.Spec.SessionAffinity)
	}
	if svc.Spec.Type == corev1.ServiceTypeLoadBalancer {
		field, ranges := "spec.loadBalancerSourceRanges", svc.Spec.LoadBalancerSourceRanges
		if len(ranges) == 0 && svc.Annotations[annotationSourceRanges] != "" {
			field = "metadata.annotations[" + annotationSourceRanges + "]"
			ranges = strings.Split(svc.Annotations[annotationSourceRanges], ",")
		}
		for i, raw := range ranges {
			pol.filtered = true
			p, err := netip.ParsePrefix(strings.TrimSpace(raw))
			if err != nil || p.Addr().Zone() != "" {
				fr.problem("%s[%d]: %q is not a CIDR; ignored", field, i, raw)
				continue
			}
			pol.sourceRanges = append(pol.sourceRanges, netip.PrefixFrom(p.Addr().Unmap(), p.Bits()-unmappedBits(p.Addr())).Masked())
		}
	}
	return pol
}

// unmappedBits is how many prefix bits an IPv4-mapped IPv6 address loses
// when unmapped.
func unmappedBits(a netip.Addr) int {
	if a.Is4In6() {
		return 96
	}
	return 0
}

// addServicePort adds the chains and frontends of one Service port in one
// family. Cluster traffic policy uses the cluster endpoints (topology
// applied), Local the endpoints on this node, each set falling back to
// terminating endpoints on its own. Frontends go to the port's chains
// when the policy that serves them has endpoints; to the no-endpoint maps
// otherwise (reject when the Service has no usable endpoint anywhere,
// drop when only this node has none).
func (fr *fragment) addServicePort(key types.NamespacedName, f Family, vip netip.Addr, external []externalAddr,
	port corev1.ServicePort, proto Protocol, slicesOf []*discoveryv1.EndpointSlice, s *settings, indexes indexSource, pol policy) {
	portID := servicePortID(key, proto, port.Port)
	comment := frontendComment(key, port.Name, port.Port)
	all := portEndpoints(slicesOf, f, port.Name, proto)
	hasEndpoints := len(usableEndpoints(all)) > 0
	nodePort := uint16(0)
	if port.NodePort > 0 && port.NodePort <= 65535 {
		nodePort = uint16(port.NodePort)
	}
	externallyAccessible := len(external) > 0 || nodePort != 0
	internalLocal, externalLocal := pol.internalLocal, pol.externalLocal && externallyAccessible
	usesCluster := !internalLocal || externallyAccessible

	var cluster, local []endpoint
	if usesCluster {
		cluster = clusterEndpoints(all, s)
	}
	local = localEndpoints(all, s)
	usesLocal := (internalLocal || externalLocal) && len(local) > 0

	summary := PortSummary{Family: f, Proto: proto, Frontends: []netip.AddrPort{netip.AddrPortFrom(vip, uint16(port.Port))},
		NodePort: nodePort, LocalEndpoints: countReady(local), AffinityTimeout: pol.affinity}
	for _, ext := range external {
		summary.Frontends = append(summary.Frontends, netip.AddrPortFrom(ext.addr, uint16(port.Port)))
	}

	clusterChain, localChain := serviceChainName(f, portID), localChainName(f, portID)
	// With session affinity, every chain of the port looks clients up in
	// one affinity map, and every frontend that reaches them records its
	// new connections there after DNAT (affinity-record in the base).
	var affinity *affinityUpdate
	if pol.affinity != 0 && hasEndpoints {
		affinity = &affinityUpdate{family: f, set: affinityMapName(f, portID), timeout: pol.affinity}
		fr.updates = append(fr.updates, *affinity)
	}
	recordElement := func(set string, k Key) []Element {
		if affinity == nil {
			return nil
		}
		return []Element{{Set: set, Key: k, Verdict: Goto(affinity.chain()), Comment: comment}}
	}
	affinitySet := ""
	if affinity != nil {
		affinitySet = affinity.set
	}
	reachable := map[netip.AddrPort]bool{}
	if hasEndpoints && usesCluster {
		fr.addEndpointChain(f, clusterChain, comment, proto, cluster, fr.markFromOutside(f, s), indexes, affinitySet, reachable)
	}
	if hasEndpoints && usesLocal {
		fr.addEndpointChain(f, localChain, comment, proto, local, nil, indexes, affinitySet, reachable)
	}
	summary.Endpoints = slices.SortedFunc(maps.Keys(reachable), netip.AddrPort.Compare)
	fr.ports = append(fr.ports, summary)

	ipMap, nodePortMap := familySet(setServiceIPs, f), familySet(setServiceNodePorts, f)
	noEpMap, noEpNodePortMap := familySet(setNoEndpointServices, f), familySet(setNoEndpointNodePorts, f)
	reject, drop := Goto(chainRejectPacket), Verdict{Kind: VerdictDrop}
	ipGroup, nodePortGroup := groupFrontends.in(f), groupNodePorts.in(f)
	ipKey := func(a netip.Addr) Key { return Key{Addr: a, Proto: proto, Port: uint16(port.Port)} }
	affinityFrontends, affinityNodePorts := familySet(setAffinityFrontends, f), familySet(setAffinityNodePorts, f)

	// The ClusterIP.
	cl := claim{group: ipGroup, rank: rankAllocated, frontend: "ClusterIP"}
	switch {
	case !hasEndpoints:
		cl.Element = Element{Set: noEpMap, Key: ipKey(vip), Verdict: reject, Comment: comment}
	case internalLocal && !usesLocal:
		cl.Element = Element{Set: noEpMap, Key: ipKey(vip), Verdict: drop, Comment: comment}
	case internalLocal:
		target := localChain
		if mark := fr.markFromOutside(f, s); mark != nil {
			// ClusterIP traffic from outside the cluster is masqueraded
			// (as under Cluster policy); external traffic that reaches the
			// same local endpoints is not, so it has its own chain.
			target = internalChainName(f, portID)
			fr.chains = append(fr.chains, &Chain{Name: target, Rules: []Rule{*mark, {Stmts: []Stmt{VerdictStmt{Goto(localChain)}}}}})
		}
		cl.Element = Element{Set: ipMap, Key: ipKey(vip), Verdict: Goto(target), Comment: comment}
		cl.extra = recordElement(affinityFrontends, ipKey(vip))
	default:
		cl.Element = Element{Set: ipMap, Key: ipKey(vip), Verdict: Goto(clusterChain), Comment: comment}
		cl.extra = recordElement(affinityFrontends, ipKey(vip))
	}
	fr.claims = append(fr.claims, cl)
	if !externallyAccessible {
		return
	}

	// External frontends: through the port's external chain, or refused.
	extChain := externalChainName(f, portID)
	externalFrontend := func(set string, k Key, group claimGroup, rank claimRank, kind string, noEpSet, recordSet string) claim {
		c := claim{group: group, rank: rank, frontend: kind}
		switch {
		case !hasEndpoints:
			c.Element = Element{Set: noEpSet, Key: k, Verdict: reject, Comment: comment}
		default:
			c.Element = Element{Set: set, Key: k, Verdict: Goto(extChain), Comment: comment}
			c.extra = recordElement(recordSet, k)
			if externalLocal && !usesLocal {
				// What the external chain does not send on (traffic from
				// outside the cluster) is dropped by the filter check.
				c.extra = append(c.extra, Element{Set: noEpSet, Key: k, Verdict: drop, Comment: comment})
			}
		}
		return c
	}
	for _, ext := range external {
		c := externalFrontend(ipMap, ipKey(ext.addr), ipGroup, rankUserSupplied, ext.kind, noEpMap, affinityFrontends)
		if ext.kind == kindLoadBalancerIP && pol.filtered {
			c.extra = append(c.extra, firewallElements(f, ipKey(ext.addr), pol.sourceRanges, s, comment)...)
		}
		fr.claims = append(fr.claims, c)
	}
	if nodePort != 0 {
		fr.claims = append(fr.claims, externalFrontend(nodePortMap, Key{Proto: proto, Port: nodePort}, nodePortGroup, rankAllocated, "NodePort", noEpNodePortMap, affinityNodePorts))
	}
	if !hasEndpoints {
		return
	}
	var rules []Rule
	if !externalLocal {
		// Traffic that arrives on an external frontend is masqueraded so
		// that replies come back through this node.
		rules = []Rule{
			{Stmts: []Stmt{SetMarkBits{s.markBit}}, Comment: "external traffic"},
			{Stmts: []Stmt{VerdictStmt{Goto(clusterChain)}}},
		}
	} else {
		// externalTrafficPolicy Local: traffic from outside goes to local
		// endpoints with its source kept; pods and the node itself reach
		// any endpoint, as through a load balancer outside.
		if m := s.localMatch(f); m != nil {
			rules = append(rules, Rule{Stmts: []Stmt{m, VerdictStmt{Goto(clusterChain)}}, Comment: "short-circuit pod traffic"})
		}
		rules = append(rules, Rule{Stmts: []Stmt{MatchFibSaddrLocal{}, SetMarkBits{s.markBit}, VerdictStmt{Goto(clusterChain)}}, Comment: "masquerade and short-circuit local traffic"})
		if usesLocal {
			rules = append(rules, Rule{Stmts: []Stmt{VerdictStmt{Goto(localChain)}}})
		}
	}
	fr.chains = append(fr.chains, &Chain{Name: extChain, Rules: rules})
}

// kindLoadBalancerIP names LoadBalancer frontends.
const kindLoadBalancerIP = "LoadBalancer IP"

// firewallElements are the firewall elements of one LoadBalancer
// frontend: the frontend, and its allowed source ranges of the family,
// none inside another (the kernel refuses overlapping ranges). When a
// range holds one of the node's addresses, the LoadBalancer IP itself is
// allowed too: a node reaching a VIP it holds locally comes from the VIP
// (as kube-proxy does).
func firewallElements(f Family, frontend Key, ranges []netip.Prefix, s *settings, comment string) []Element {
	var mine []netip.Prefix
	fromNode := false
	for _, p := range ranges {
		if familyOf(p.Addr()) != f {
			continue
		}
		mine = append(mine, p)
		fromNode = fromNode || slices.ContainsFunc(s.nodeAddrs[f], p.Contains)
	}
	if fromNode {
		mine = append(mine, netip.PrefixFrom(frontend.Addr, frontend.Addr.BitLen()))
	}
	slices.SortFunc(mine, func(a, b netip.Prefix) int {
		return cmp.Or(cmp.Compare(a.Bits(), b.Bits()), a.Addr().Compare(b.Addr()))
	})
	out := []Element{{Set: familySet(setFirewallIPs, f), Key: frontend, Comment: comment}}
	var kept []netip.Prefix
	for _, p := range mine {
		if slices.ContainsFunc(kept, func(k netip.Prefix) bool { return k.Contains(p.Addr()) }) {
			continue
		}
		kept = append(kept, p)
		k := frontend
		k.Source = p
		out = append(out, Element{Set: familySet(setFirewallAllow, f), Key: k, Comment: comment})
	}
	return out
}

// markFromOutside is the rule of a cluster chain that marks ClusterIP
// traffic from outside the cluster (or all, with masqueradeAll) for
// masquerade; nil when no source counts as outside.
func (fr *fragment) markFromOutside(f Family, s *settings) *Rule {
	switch {
	case s.masqAll:
		return &Rule{Stmts: []Stmt{SetMarkBits{s.markBit}}, Comment: "masqueradeAll"}
	case s.localIfPrefix != "" || s.localCIDRs[f].IsValid():
		return &Rule{Stmts: []Stmt{s.notLocalMatch(f), SetMarkBits{s.markBit}}, Comment: "ClusterIP traffic from outside the cluster"}
	}
	return nil
}

// addEndpointChain adds a chain that DNATs to one of eps, drawn at random
// from the chain's run of an endpoint map. Endpoints enter the hairpin
// set, so a pod reaching itself through the Service is masqueraded.
//
// With session affinity (affinitySet names the port's map), a rule first
// DNATs a client to the endpoint the map holds for it and this frontend;
// a client without one falls through to the draw. The map is filled
// after DNAT, from conntrack, by the shared chains affinity-record
// dispatches to (base.go), so the chain needs no rule per endpoint. The
// agent deletes entries whose endpoint the port no longer has
// (affinity.go).
func (fr *fragment) addEndpointChain(f Family, chain, comment string, proto Protocol, eps []endpoint, mark *Rule, indexes indexSource, affinitySet string, reachable map[netip.AddrPort]bool) {
	var rules []Rule
	if mark != nil {
		rules = append(rules, *mark)
	}
	for _, ep := range eps {
		reachable[ep.addr] = true
		fr.claims = append(fr.claims, claim{
			Element: Element{Set: familySet(setHairpin, f), Key: Key{Addr: ep.addr.Addr(), Addr2: ep.addr.Addr()}},
			group:   groupHairpin.in(f), rank: rankAllocated,
		})
	}
	if affinitySet != "" {
		rules = append(rules, Rule{Stmts: []Stmt{MatchL4Proto{proto}, DNATAffinity{Family: f, Set: affinitySet}},
			Comment: "session affinity"})
	}
	endpoints := endpointMapName(f, chain)
	offset := indexes(endpoints, chain, len(eps))
	for i, ep := range eps {
		fr.owned = append(fr.owned, Element{Set: endpoints, Key: Key{Index: offset + uint32(i)}, Target: ep.addr, Comment: comment})
	}
	rules = append(rules, Rule{Stmts: []Stmt{MatchL4Proto{proto}, DNATRandom{Family: f, Count: uint32(len(eps)), Offset: offset, Map: endpoints}}})
	fr.chains = append(fr.chains, &Chain{Name: chain, Rules: rules})
}
