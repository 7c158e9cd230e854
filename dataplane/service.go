package dataplane

import (
	"cmp"
	"fmt"
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
}

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

func endpointAddrs(eps []endpoint) []netip.AddrPort {
	out := make([]netip.AddrPort, len(eps))
	for i, ep := range eps {
		out[i] = ep.addr
	}
	return out
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
				external[familyOf(a)] = append(external[familyOf(a)], externalAddr{a, "LoadBalancer IP"})
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
			fr.addServicePort(key, f, vip, external[f], port.ServicePort, port.proto, st.Slices, s, indexes)
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

// addServicePort adds the chains and frontends of one Service port in one
// family: the ClusterIP, NodePort, externalIP and LoadBalancer frontends
// go to the port's chains when it has usable endpoints, and to the
// no-endpoint maps (which reject) when it has none.
func (fr *fragment) addServicePort(key types.NamespacedName, f Family, vip netip.Addr, external []externalAddr,
	port corev1.ServicePort, proto Protocol, slicesOf []*discoveryv1.EndpointSlice, s *settings, indexes indexSource) {
	portID := servicePortID(key, proto, port.Port)
	comment := frontendComment(key, port.Name, port.Port)
	usable := usableEndpoints(portEndpoints(slicesOf, f, port.Name, proto))
	eps := endpointAddrs(usable)
	summary := PortSummary{Family: f, Proto: proto, Frontends: []netip.AddrPort{netip.AddrPortFrom(vip, uint16(port.Port))}, Endpoints: eps}
	for _, ep := range usable {
		if ep.nodeName != "" && ep.nodeName == s.nodeName {
			summary.LocalEndpoints++
		}
	}
	for _, ext := range external {
		summary.Frontends = append(summary.Frontends, netip.AddrPortFrom(ext.addr, uint16(port.Port)))
	}
	if port.NodePort > 0 && port.NodePort <= 65535 {
		summary.NodePort = uint16(port.NodePort)
	}
	fr.ports = append(fr.ports, summary)

	ipMap, nodePortMap := familySet(setServiceIPs, f), familySet(setServiceNodePorts, f)
	clusterTarget, externalTarget := Goto(serviceChainName(f, portID)), Goto(externalChainName(f, portID))
	if len(eps) == 0 {
		ipMap, nodePortMap = familySet(setNoEndpointServices, f), familySet(setNoEndpointNodePorts, f)
		clusterTarget, externalTarget = Goto(chainRejectPacket), Goto(chainRejectPacket)
	} else {
		fr.addPortChains(f, portID, comment, proto, eps, s, indexes)
	}
	hasExternal := false

	ipGroup, nodePortGroup := groupFrontends.in(f), groupNodePorts.in(f)
	fr.claims = append(fr.claims, claim{
		Element: Element{Set: ipMap, Key: Key{Addr: vip, Proto: proto, Port: uint16(port.Port)}, Verdict: clusterTarget, Comment: comment},
		group:   ipGroup, rank: rankAllocated, frontend: "ClusterIP",
	})
	for _, ext := range external {
		hasExternal = true
		fr.claims = append(fr.claims, claim{
			Element: Element{Set: ipMap, Key: Key{Addr: ext.addr, Proto: proto, Port: uint16(port.Port)}, Verdict: externalTarget, Comment: comment},
			group:   ipGroup, rank: rankUserSupplied, frontend: ext.kind,
		})
	}
	if port.NodePort > 0 && port.NodePort <= 65535 {
		hasExternal = true
		fr.claims = append(fr.claims, claim{
			Element: Element{Set: nodePortMap, Key: Key{Proto: proto, Port: uint16(port.NodePort)}, Verdict: externalTarget, Comment: comment},
			group:   nodePortGroup, rank: rankAllocated, frontend: "NodePort",
		})
	}
	if hasExternal && len(eps) > 0 {
		// Traffic that arrives on an external frontend is masqueraded so
		// that replies come back through this node.
		fr.chains = append(fr.chains, &Chain{Name: externalChainName(f, portID), Rules: []Rule{
			{Stmts: []Stmt{SetMarkBits{s.markBit}}, Comment: "external traffic"},
			{Stmts: []Stmt{VerdictStmt{Goto(serviceChainName(f, portID))}}},
		}})
	}
}

// addPortChains adds the service chain of a port: masquerade what comes
// from outside the cluster, then DNAT to an endpoint drawn at random from
// the port's run of the endpoint map. Endpoints also enter the hairpin
// set, so a pod reaching itself through the Service is masqueraded.
func (fr *fragment) addPortChains(f Family, portID, comment string, proto Protocol, eps []netip.AddrPort, s *settings, indexes indexSource) {
	var rules []Rule
	markRule := Rule{Comment: "ClusterIP traffic from outside the cluster"}
	switch {
	case s.masqAll:
		markRule.Stmts = []Stmt{SetMarkBits{s.markBit}}
		markRule.Comment = "masqueradeAll"
	case s.localIfPrefix != "":
		markRule.Stmts = []Stmt{MatchIifnamePrefix{Prefix: s.localIfPrefix, Negate: true}, SetMarkBits{s.markBit}}
	case s.localCIDRs[f].IsValid():
		markRule.Stmts = []Stmt{MatchAddr{Field: Saddr, Prefix: s.localCIDRs[f], Negate: true}, SetMarkBits{s.markBit}}
	}
	if markRule.Stmts != nil {
		rules = append(rules, markRule)
	}
	chain := serviceChainName(f, portID)
	endpoints := endpointMapName(f, chain)
	offset := indexes(endpoints, chain, len(eps))
	for i, ep := range eps {
		fr.owned = append(fr.owned, Element{Set: endpoints, Key: Key{Index: offset + uint32(i)}, Target: ep, Comment: comment})
		fr.claims = append(fr.claims, claim{
			Element: Element{Set: familySet(setHairpin, f), Key: Key{Addr: ep.Addr(), Addr2: ep.Addr()}},
			group:   groupHairpin.in(f), rank: rankAllocated,
		})
	}
	rules = append(rules, Rule{Stmts: []Stmt{MatchL4Proto{proto}, DNATRandom{Family: f, Count: uint32(len(eps)), Offset: offset, Map: endpoints}}})
	fr.chains = append(fr.chains, &Chain{Name: chain, Rules: rules})
}
