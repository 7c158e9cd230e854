package dataplane

import (
	"net/netip"
	"slices"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// Packet-flow tests of the Service policies: traffic policies, session
// affinity, source ranges, terminating endpoints and topology, walked
// through the model by the tracer.

var (
	podClient     = addr("10.1.0.50")
	outsideClient = addr("192.168.0.2")
	nodeAddr      = addr("192.168.0.1")
)

type flow struct {
	name string
	p    packet
	want string
}

func checkFlows(t *testing.T, rs *Ruleset, flows []flow) {
	t.Helper()
	tr := newTracer(rs)
	for _, f := range flows {
		if got := tr.trace(f.p).String(); got != f.want {
			t.Errorf("%s: got %s, want %s", f.name, got, f.want)
		}
	}
}

func tcp(src, dst netip.Addr, port uint16) packet {
	return packet{src: src, dst: dst, proto: TCP, dport: port}
}

func fromNode(dst netip.Addr, port uint16) packet {
	return packet{src: nodeAddr, dst: dst, proto: TCP, dport: port, local: true}
}

// policySnapshot has one Service with the options given, endpoints
// 10.1.0.11 and fd00:10::11 on this node and .12/.13 (::12/::13) on
// another, a NodePort, an externalIP and a LoadBalancer IP.
func policySnapshot(eps4 []ep, opts ...svcOption) (*Snapshot, types.NamespacedName) {
	opts = append([]svcOption{withNodePorts(30080), withExternalIPs("203.0.113.10"),
		withLoadBalancer(corev1.LoadBalancerIngress{IP: "198.51.100.10"}, corev1.LoadBalancerIngress{IP: "2001:db8::10"})}, opts...)
	svc := service("default", "pol", []string{"10.96.0.10", "fd00:96::10"}, []string{"http:80"}, opts...)
	svc.Spec.Ports[0].NodePort = 30080
	eps6 := make([]ep, len(eps4))
	for i, e := range eps4 {
		e.addr = strings.Replace(e.addr, "10.1.0.", "fd00:10::", 1)
		eps6[i] = e
	}
	snap := newSnapshot(state(svc,
		slice(svc, "pol-v4", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, eps4...),
		slice(svc, "pol-v6", discoveryv1.AddressTypeIPv6, []string{"http:8080"}, eps6...)))
	return snap, types.NamespacedName{Namespace: "default", Name: "pol"}
}

func threeEndpoints() []ep {
	return remote([]ep{ready("10.1.0.11"), ready("10.1.0.12"), ready("10.1.0.13")}, 1)
}

const (
	all3       = "10.1.0.11:8080, 10.1.0.12:8080, 10.1.0.13:8080"
	all3Masq   = "10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded), 10.1.0.13:8080 (masqueraded)"
	all3v6Masq = "[fd00:10::11]:8080 (masqueraded), [fd00:10::12]:8080 (masqueraded), [fd00:10::13]:8080 (masqueraded)"
)

func TestTraceInternalTrafficPolicyLocal(t *testing.T) {
	snap, _ := policySnapshot(threeEndpoints(), withInternalPolicyLocal())
	checkFlows(t, Compute(snap), []flow{
		{"ClusterIP from a pod: local endpoints only", tcp(podClient, addr("10.96.0.10"), 80), "10.1.0.11:8080"},
		{"ClusterIP from outside: local, masqueraded", tcp(outsideClient, addr("10.96.0.10"), 80), "10.1.0.11:8080 (masqueraded)"},
		{"IPv6 ClusterIP", tcp(addr("fd00:10::50"), addr("fd00:96::10"), 80), "[fd00:10::11]:8080"},
		{"external frontends keep Cluster policy", tcp(outsideClient, nodeAddr, 30080), all3Masq},
	})

	snap, _ = policySnapshot(remote(threeEndpoints(), 0), withInternalPolicyLocal())
	checkFlows(t, Compute(snap), []flow{
		{"no local endpoint: dropped", tcp(podClient, addr("10.96.0.10"), 80), "dropped"},
		{"no local endpoint, from the node: dropped", fromNode(addr("10.96.0.10"), 80), "dropped"},
		{"NodePort still reaches all", tcp(outsideClient, nodeAddr, 30080), all3Masq},
	})
}

func TestTraceExternalTrafficPolicyLocal(t *testing.T) {
	snap, _ := policySnapshot(threeEndpoints(), withExternalPolicyLocal())
	checkFlows(t, Compute(snap), []flow{
		{"NodePort from outside: local endpoint, source kept", tcp(outsideClient, nodeAddr, 30080), "10.1.0.11:8080"},
		{"externalIP from outside", tcp(outsideClient, addr("203.0.113.10"), 80), "10.1.0.11:8080"},
		{"LoadBalancer IP from outside", tcp(outsideClient, addr("198.51.100.10"), 80), "10.1.0.11:8080"},
		{"IPv6 LoadBalancer IP from outside", tcp(addr("fd00:1::2"), addr("2001:db8::10"), 80), "[fd00:10::11]:8080"},
		{"NodePort from a pod: any endpoint", tcp(podClient, nodeAddr, 30080), all3},
		{"LoadBalancer IP from the node: any endpoint, masqueraded", fromNode(addr("198.51.100.10"), 80), all3Masq},
		{"ClusterIP keeps Cluster policy", tcp(outsideClient, addr("10.96.0.10"), 80), all3Masq},
	})

	snap, _ = policySnapshot(remote(threeEndpoints(), 0), withExternalPolicyLocal())
	checkFlows(t, Compute(snap), []flow{
		{"no local endpoint: NodePort from outside dropped", tcp(outsideClient, nodeAddr, 30080), "dropped"},
		{"no local endpoint: LoadBalancer IP from outside dropped", tcp(outsideClient, addr("198.51.100.10"), 80), "dropped"},
		{"IPv6 too", tcp(addr("fd00:1::2"), addr("2001:db8::10"), 80), "dropped"},
		{"from a pod: still served", tcp(podClient, addr("198.51.100.10"), 80), all3},
		{"from the node: still served", fromNode(addr("203.0.113.10"), 80), all3Masq},
	})
}

func TestTraceSourceRanges(t *testing.T) {
	snap, _ := policySnapshot(threeEndpoints(), withSourceRanges("192.168.0.0/30", "2001:db8:1::/48"))
	checkFlows(t, Compute(snap), []flow{
		{"LoadBalancer IP from inside the ranges", tcp(outsideClient, addr("198.51.100.10"), 80), all3Masq},
		{"LoadBalancer IP from outside the ranges", tcp(addr("192.168.0.9"), addr("198.51.100.10"), 80), "dropped"},
		{"from a pod outside the ranges", tcp(podClient, addr("198.51.100.10"), 80), "dropped"},
		{"from the node (in a range)", fromNode(addr("198.51.100.10"), 80), all3Masq},
		{"IPv6 inside", tcp(addr("2001:db8:1::5"), addr("2001:db8::10"), 80), all3v6Masq},
		{"IPv6 outside", tcp(addr("2001:db8:2::5"), addr("2001:db8::10"), 80), "dropped"},
		{"NodePort is not filtered", tcp(addr("192.168.0.9"), nodeAddr, 30080), all3Masq},
		{"ClusterIP is not filtered", tcp(addr("192.168.0.9"), addr("10.96.0.10"), 80), all3Masq},
		{"externalIP is not filtered", tcp(addr("192.168.0.9"), addr("203.0.113.10"), 80), all3Masq},
	})
}

func TestTraceTerminatingEndpoints(t *testing.T) {
	term := func(addr, node string) ep { e := terminating(addr); e.node = node; return e }
	// Cluster-wide: nothing ready, so the serving terminating ones; the
	// terminating endpoint that no longer serves is never used.
	snap, _ := policySnapshot([]ep{term("10.1.0.11", testNode), term("10.1.0.12", otherNode),
		{addr: "10.1.0.13", node: otherNode, terminating: true}})
	checkFlows(t, Compute(snap), []flow{
		{"no ready endpoint: serving terminating ones", tcp(podClient, addr("10.96.0.10"), 80), "10.1.0.11:8080, 10.1.0.12:8080"},
	})
	// Ready ones are back: only they are used.
	snap, _ = policySnapshot([]ep{term("10.1.0.11", testNode), ready("10.1.0.13")})
	checkFlows(t, Compute(snap), []flow{
		{"ready endpoints again", tcp(podClient, addr("10.96.0.10"), 80), "10.1.0.13:8080"},
	})
	// The local set falls back on its own: the only local endpoint is
	// terminating while a remote one is ready.
	snap, _ = policySnapshot([]ep{term("10.1.0.11", testNode), remote([]ep{ready("10.1.0.12")}, 0)[0]}, withExternalPolicyLocal())
	checkFlows(t, Compute(snap), []flow{
		{"Local: the terminating local endpoint", tcp(outsideClient, nodeAddr, 30080), "10.1.0.11:8080"},
		{"Cluster: the ready remote endpoint", tcp(podClient, nodeAddr, 30080), "10.1.0.12:8080"},
	})
}

func TestTraceTopology(t *testing.T) {
	zoned := func(e ep, zones ...string) ep { e.zones = zones; return e }
	eps := []ep{zoned(ready("10.1.0.11"), "zone-a"), zoned(ready("10.1.0.12"), "zone-a"), zoned(ready("10.1.0.13"), "zone-b")}
	snap, _ := policySnapshot(eps)
	snap.NodeZone = "zone-a"
	checkFlows(t, Compute(snap), []flow{
		{"hints for this zone", tcp(podClient, addr("10.96.0.10"), 80), "10.1.0.11:8080, 10.1.0.12:8080"},
		{"external traffic too", tcp(outsideClient, nodeAddr, 30080), "10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"},
	})
	snap.NodeZone = "zone-c"
	checkFlows(t, Compute(snap), []flow{
		{"no hint for this zone: all", tcp(podClient, addr("10.96.0.10"), 80), all3},
	})
	eps[2].zones = nil
	snap, _ = policySnapshot(eps)
	snap.NodeZone = "zone-a"
	checkFlows(t, Compute(snap), []flow{
		{"an endpoint without hints: all", tcp(podClient, addr("10.96.0.10"), 80), all3},
	})
}

// TestTraceAffinity follows clients through session affinity: a first
// connection may reach any endpoint, and the path after DNAT records the
// one it reached; later ones reach only that one, per client and
// frontend, until the agent removes the entry of an endpoint that is
// gone.
func TestTraceAffinity(t *testing.T) {
	snap, key := policySnapshot(threeEndpoints(), withAffinity(2))
	rs := Compute(snap)
	tr := newTracer(rs)
	vip := tcp(podClient, addr("10.96.0.10"), 80)
	first := tr.trace(vip)
	if first.String() != all3 || !strings.HasPrefix(first.affinity, "affinity4-") || first.affinityTimeout != 2 {
		t.Fatalf("first connection: %s recorded in %q for %ds, want any endpoint recorded in an IPv4 affinity map for 2s",
			first, first.affinity, first.affinityTimeout)
	}
	tr.stick(first.affinity, vip, addrPort("10.1.0.12:8080"))
	for range 20 {
		got := tr.trace(vip)
		if got.String() != "10.1.0.12:8080" || got.affinity != first.affinity {
			t.Fatalf("sticky client: got %s, recorded in %q (the timeout refreshed)", got, got.affinity)
		}
	}
	checkFlowsOn(t, tr, []flow{
		{"another client is free", tcp(addr("10.1.0.51"), addr("10.96.0.10"), 80), all3},
		{"the same client on another frontend is free", tcp(podClient, addr("203.0.113.10"), 80), all3Masq},
	})

	// Every frontend records, in the port's one map: external ones
	// (through the external chain), the NodePort on a node address, and
	// the node's own connections (output, after DNAT).
	for _, p := range []packet{
		tcp(outsideClient, addr("203.0.113.10"), 80),
		tcp(outsideClient, addr("198.51.100.10"), 80),
		tcp(outsideClient, nodeAddr, 30080),
		fromNode(addr("10.96.0.10"), 80),
		fromNode(nodeAddr, 30080),
	} {
		if got := tr.trace(p); got.affinity != first.affinity || got.affinityTimeout != 2 {
			t.Errorf("%v to %v:%d: recorded in %q for %ds, want %s for 2s", p.src, p.dst, p.dport, got.affinity, got.affinityTimeout, first.affinity)
		}
	}
	v6 := tcp(addr("fd00:10::50"), addr("fd00:96::10"), 80)
	if got := tr.trace(v6); !strings.HasPrefix(got.affinity, "affinity6-") {
		t.Errorf("IPv6 records in %q, want an IPv6 affinity map", got.affinity)
	}
	v6Sticky := tcp(addr("fd00:10::50"), addr("fd00:96::10"), 80)
	tr.stick(tr.trace(v6).affinity, v6Sticky, addrPort("[fd00:10::13]:8080"))
	if got := tr.trace(v6Sticky).String(); got != "[fd00:10::13]:8080" {
		t.Errorf("sticky IPv6 client: got %s", got)
	}

	// The Service's chains hold one affinity rule each, whatever their
	// endpoint count: the recording is in the shared chains.
	for _, c := range rs.Services[key].Chains {
		lookups := 0
		for _, r := range c.Rules {
			for _, s := range r.Stmts {
				switch s.(type) {
				case DNATAffinity:
					lookups++
				case RecordAffinity:
					t.Errorf("%s records affinity itself: %s", c.Name, r)
				}
			}
		}
		if strings.HasPrefix(c.Name, "svc") || strings.HasPrefix(c.Name, "local") {
			if lookups != 1 {
				t.Errorf("%s: %d affinity lookups, want 1", c.Name, lookups)
			}
		}
	}
	var shared []string
	for _, c := range rs.Shared {
		shared = append(shared, c.Name)
	}
	if want := []string{"update-" + first.affinity + "-2s", "update-" + tr.trace(v6).affinity + "-2s"}; !slices.Equal(shared, want) {
		t.Errorf("shared chains %v, want %v", shared, want)
	}

	// The endpoint goes away: the agent deletes the entry, and the
	// client is free again among the rest.
	c := NewComputer()
	before := c.Compute(snap)
	snap2, _ := policySnapshot(remote([]ep{ready("10.1.0.11"), ready("10.1.0.13")}, 1), withAffinity(2))
	after := c.Compute(snap2)
	tr2 := newTracer(after)
	tr2.affinity = tr.affinity
	check := newAffinityCheck(before, after)
	if check == nil {
		t.Fatal("no affinity check after an endpoint of an affinity Service went away")
	}
	var entries []affinityEntry
	for k, ep := range tr.affinity[first.affinity] {
		entries = append(entries, affinityEntry{Key: k, Endpoint: ep})
	}
	stale := check.stale(IPv4, entries)
	if len(stale) != 1 || stale[0].Key != affinityKeyOf(vip) {
		t.Fatalf("stale entries %v, want the client's", stale)
	}
	if !check.maps[first.affinity] {
		t.Errorf("the check does not read %s", first.affinity)
	}
	delete(tr2.affinity[first.affinity], stale[0].Key)
	if got := tr2.trace(vip).String(); got != "10.1.0.11:8080, 10.1.0.13:8080" {
		t.Errorf("after its endpoint went away: %s", got)
	}

	// Affinity switched off: no recording, any endpoint.
	snap3, _ := policySnapshot(threeEndpoints())
	off := c.Compute(snap3)
	tr3 := newTracer(off)
	tr3.affinity = tr.affinity
	if got := tr3.trace(vip); got.String() != all3 || got.affinity != "" {
		t.Errorf("affinity off: %s recorded in %q", got, got.affinity)
	}
	if newAffinityCheck(off, c.Compute(snap3)) != nil {
		t.Error("an affinity check for a change that touched no Service")
	}
}

func checkFlowsOn(t *testing.T, tr *tracer, flows []flow) {
	t.Helper()
	for _, f := range flows {
		if got := tr.trace(f.p).String(); got != f.want {
			t.Errorf("%s: got %s, want %s", f.name, got, f.want)
		}
	}
}

// TestAffinityCheckNodePort: entries of a NodePort name the node address
// the client used, which the check matches by protocol and port.
func TestAffinityCheckNodePort(t *testing.T) {
	c := NewComputer()
	snap, _ := policySnapshot(threeEndpoints(), withAffinity(60))
	before := c.Compute(snap)
	snap2, _ := policySnapshot(threeEndpoints()[:2], withAffinity(60))
	check := newAffinityCheck(before, c.Compute(snap2))
	entry := func(front string, port uint16, ep string) affinityEntry {
		return affinityEntry{Key: Key{Addr: outsideClient, Addr2: addr(front), Proto: TCP, Port: port}, Endpoint: addrPort(ep)}
	}
	entries := []affinityEntry{
		entry("192.168.0.1", 30080, "10.1.0.13:8080"), // stale
		entry("192.168.0.1", 30080, "10.1.0.12:8080"), // live
		entry("198.51.100.10", 80, "10.1.0.13:8080"),  // stale
		entry("198.51.100.99", 80, "10.1.0.13:8080"),  // another Service's frontend: not ours to judge
	}
	var got []Key
	for _, e := range check.stale(IPv4, entries) {
		got = append(got, e.Key)
	}
	want := []Key{entries[0].Key, entries[2].Key}
	if !slices.Equal(got, want) {
		t.Errorf("stale %v, want %v", got, want)
	}
}

func TestPolicyProblems(t *testing.T) {
	snap, key := policySnapshot(threeEndpoints(), withAffinity(0),
		withLoadBalancer(corev1.LoadBalancerIngress{IP: "198.51.100.10"}, corev1.LoadBalancerIngress{IP: "fd00:zz::1"}),
		withSourceRanges("192.168.0.0/30", "bogus"))
	svc := snap.Services[key].Service
	svc.Spec.ClusterIPs = svc.Spec.ClusterIPs[:1] // IPv4 only: the IPv6 LoadBalancer IP is of the wrong family
	svc.Status.LoadBalancer.Ingress = append(svc.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: "2001:db8::10"})
	rs := Compute(snap)
	want := []string{
		`default/pol: spec.loadBalancerSourceRanges[1]: "bogus" is not a CIDR; ignored`,
		`default/pol: spec.sessionAffinityConfig.clientIP.timeoutSeconds: 0 is outside 1..86400; using 10800`,
		`default/pol: status.loadBalancer.ingress[1].ip: "fd00:zz::1" is not an IP address; skipped`,
		`default/pol: status.loadBalancer.ingress[2].ip: 2001:db8::10 is IPv6 but the Service has no IPv6 ClusterIP; skipped`,
	}
	got := rs.Problems()
	slices.Sort(got)
	if !slices.Equal(got, want) {
		t.Errorf("problems:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
	// The rest is programmed: the valid LoadBalancer IP, its source
	// ranges, the default timeout.
	checkFlows(t, rs, []flow{
		{"valid LoadBalancer IP, in range", tcp(outsideClient, addr("198.51.100.10"), 80), all3Masq},
		{"valid LoadBalancer IP, out of range", tcp(addr("192.168.0.9"), addr("198.51.100.10"), 80), "dropped"},
	})
	for _, p := range rs.Services[key].Ports {
		if p.AffinityTimeout != defaultAffinityTimeout {
			t.Errorf("%v affinity timeout %d, want the default", p.Family, p.AffinityTimeout)
		}
	}
}
