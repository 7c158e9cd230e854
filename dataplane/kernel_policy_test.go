package dataplane

import (
	"errors"
	"maps"
	"net/netip"
	"slices"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

// Kernel traffic tests of the Service policies, on kernelSnapshot's
// sticky (ClientIP affinity) and guarded (LoadBalancer, source ranges,
// externalTrafficPolicy Local, pod0 its only local endpoint) Services.

// dropTimeout is how long a connection expected to be dropped is given.
const dropTimeout = time.Second

// replaced returns a copy of snap with one Service's state replaced.
func replaced(snap *Snapshot, st ServiceState) *Snapshot {
	out := *snap
	out.Services = maps.Clone(snap.Services)
	out.Services[types.NamespacedName{Namespace: st.Service.Namespace, Name: st.Service.Name}] = st
	return &out
}

func podEndpoints(tp *netnstest.Topology, f Family, pods ...int) []ep {
	var out []ep
	for _, i := range pods {
		a := tp.Pods[i].IPv4
		if f == IPv6 {
			a = tp.Pods[i].IPv6
		}
		out = append(out, ready(a.String()))
	}
	return out
}

// stickyState is the sticky Service with the endpoints and options given.
func stickyState(tp *netnstest.Topology, pods []int, opts ...svcOption) ServiceState {
	svc := service("default", "sticky", []string{"10.96.0.30", "fd00:96::30"}, []string{"http:80"}, opts...)
	return state(svc,
		slice(svc, "sticky-v4", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, podEndpoints(tp, IPv4, pods...)...),
		slice(svc, "sticky-v6", discoveryv1.AddressTypeIPv6, []string{"http:8080"}, podEndpoints(tp, IPv6, pods...)...))
}

// expectDropped fails unless a connection to target times out: dropped,
// neither answered nor refused.
func expectDropped(t *testing.T, from *netnstest.NS, target string) {
	t.Helper()
	r, err := from.AskTCP(target, dropTimeout)
	var te interface{ Timeout() bool }
	if err == nil || !errors.As(err, &te) || !te.Timeout() {
		t.Errorf("%s from %s: got %v %v, want the connection dropped", target, from, r, err)
	}
}

// affinityEntries reads the family's affinity maps of the applier's table.
func affinityEntries(t *testing.T, k *KernelApplier, rs *Ruleset, f Family) []affinityEntry {
	t.Helper()
	var out []affinityEntry
	for _, s := range rs.Base.Sets {
		if s.Key == KeyAffinity4 && f == IPv4 || s.Key == KeyAffinity6 && f == IPv6 {
			entries, err := k.dumpAffinity(s)
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, entries...)
		}
	}
	return out
}

func TestKernelSessionAffinity(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 4)
	startPods(t, tp)
	k := newApplier(t, tp.Node)
	outer := t
	c := NewComputer()
	base := kernelSnapshot(tp, 0, 1, 2)
	rs := c.Compute(base)
	apply(t, k, rs)

	stuck := func(from *netnstest.NS, target string) string {
		t.Helper()
		got := spread(t, from, target, 30, false)
		if s := servers(got); len(s) != 1 {
			t.Fatalf("%s from %s: servers %v, want one for every connection", target, from, s)
		}
		return servers(got)[0]
	}
	t.Run("sticky over many connections, per client and family", func(t *testing.T) {
		stuck(tp.Client, "10.96.0.30:80")
		stuck(tp.Pods[3].NS, "10.96.0.30:80")
		stuck(tp.Client, "[fd00:96::30]:80")
		for _, f := range Families {
			if n := len(affinityEntries(t, k, rs, f)); n == 0 {
				t.Errorf("no entries in the IPv%d affinity map", f)
			}
		}
	})

	t.Run("the node itself, a NodePort and a hairpin client stick too", func(t *testing.T) {
		stuck(tp.Node, "10.96.0.30:80")
		stuck(tp.Node, "[fd00:96::30]:80")
		rs = c.Compute(replaced(base, stickyState(tp, []int{0, 1, 2}, withAffinity(3), withNodePorts(30030))))
		apply(t, k, rs)
		stuck(tp.Client, "192.168.0.1:30030")
		stuck(tp.Client, "[fd00:1::1]:30030")
		stuck(tp.Pods[3].NS, "10.1.0.1:30030")
		// Pod 0, the only endpoint, reaches itself (masqueraded in
		// postrouting, after the record); with the others back, it stays.
		rs = c.Compute(replaced(base, stickyState(tp, []int{0}, withAffinity(3))))
		apply(t, k, rs)
		if s := stuck(tp.Pods[0].NS, "10.96.0.30:80"); s != tp.Pods[0].Name {
			t.Fatalf("pod 0 reached %s, its Service's only endpoint being itself", s)
		}
		rs = c.Compute(replaced(base, stickyState(tp, []int{0, 1, 2}, withAffinity(3))))
		apply(t, k, rs)
		if s := stuck(tp.Pods[0].NS, "10.96.0.30:80"); s != tp.Pods[0].Name {
			t.Errorf("the hairpin client moved to %s", s)
		}
	})

	t.Run("a removed endpoint's entries no longer pull traffic", func(t *testing.T) {
		server := stuck(tp.Client, "10.96.0.30:80")
		var rest []int
		for i := range 3 {
			if tp.Pods[i].Name != server {
				rest = append(rest, i)
			}
		}
		rs = c.Compute(replaced(base, stickyState(tp, rest, withAffinity(3))))
		apply(t, k, rs)
		if now := stuck(tp.Client, "10.96.0.30:80"); now == server {
			t.Errorf("still sent to the removed endpoint %s", server)
		}
		for _, e := range affinityEntries(t, k, rs, IPv4) {
			if e.Endpoint.Addr() == podAddr(tp, server) {
				t.Errorf("entry %v still holds the removed endpoint", e)
			}
		}
	})

	t.Run("a restarted agent keeps clients on their endpoints, minus those removed while it was down", func(t *testing.T) {
		server := stuck(tp.Client, "10.96.0.30:80")
		podServer := stuck(tp.Pods[3].NS, "10.96.0.30:80")
		// A new applier (a restarted agent) takes over the same Services.
		k2 := newApplier(outer, tp.Node)
		apply(t, k2, rs)
		if len(clientEntries(affinityEntries(t, k2, rs, IPv4), tp.ClientIPv4)) == 0 {
			t.Error("the client's affinity entry did not survive the restart")
		}
		if now := stuck(tp.Client, "10.96.0.30:80"); now != server {
			t.Errorf("the client moved from %s to %s across a restart", server, now)
		}
		// The client's endpoint went away while no agent ran: the next
		// agent's first write finds the entry stale.
		var rest []int
		for _, i := range rsPods(tp, rs) {
			if tp.Pods[i].Name != server {
				rest = append(rest, i)
			}
		}
		down := c.Compute(replaced(base, stickyState(tp, rest, withAffinity(3))))
		k3 := newApplier(outer, tp.Node) // outlives this subtest
		apply(t, k3, down)
		for _, e := range affinityEntries(t, k3, down, IPv4) {
			if e.Endpoint.Addr() == podAddr(tp, server) {
				t.Errorf("entry %v of an endpoint removed during the restart survived it", e)
			}
		}
		if now := stuck(tp.Client, "10.96.0.30:80"); now == server {
			t.Errorf("still sent to %s, removed while no agent ran", server)
		}
		if podServer != server {
			if now := stuck(tp.Pods[3].NS, "10.96.0.30:80"); now != podServer {
				t.Errorf("the pod client moved from %s to %s though its endpoint stayed", podServer, now)
			}
		}
		k, rs = k3, down
	})

	t.Run("affinity off spreads, on sticks again", func(t *testing.T) {
		rs = c.Compute(replaced(base, stickyState(tp, []int{0, 1, 2})))
		apply(t, k, rs)
		if s := servers(spread(t, tp.Client, "10.96.0.30:80", 60, false)); len(s) != 3 {
			t.Errorf("affinity off: servers %v, want all three", s)
		}
		rs = c.Compute(replaced(base, stickyState(tp, []int{0, 1, 2}, withAffinity(1))))
		apply(t, k, rs)
		stuck(tp.Client, "10.96.0.30:80")
	})

	t.Run("entries expire after the timeout, changed live to 1s", func(t *testing.T) {
		// Ten rounds that each wait out the timeout: a new draw gives
		// another endpoint with probability 2/3 each time.
		first := stuck(tp.Client, "10.96.0.30:80")
		moved := false
		for range 10 {
			time.Sleep(1500 * time.Millisecond)
			if len(clientEntries(affinityEntries(t, k, rs, IPv4), tp.ClientIPv4)) != 0 {
				t.Fatal("the client's entry outlived its 1s timeout")
			}
			if stuck(tp.Client, "10.96.0.30:80") != first {
				moved = true
				break
			}
		}
		if !moved {
			t.Errorf("the client reached %s in every round: the entry never expired", first)
		}
	})
}

// rsPods are the pods the sticky Service's IPv4 port sends to in rs.
func rsPods(tp *netnstest.Topology, rs *Ruleset) []int {
	var out []int
	for _, p := range rs.Services[types.NamespacedName{Namespace: "default", Name: "sticky"}].Ports {
		if p.Family != IPv4 {
			continue
		}
		for i, pod := range tp.Pods {
			for _, e := range p.Endpoints {
				if e.Addr() == pod.IPv4 && !slices.Contains(out, i) {
					out = append(out, i)
				}
			}
		}
	}
	return out
}

func podAddr(tp *netnstest.Topology, name string) netip.Addr {
	for _, p := range tp.Pods {
		if p.Name == name {
			return p.IPv4
		}
	}
	return netip.Addr{}
}

func clientEntries(entries []affinityEntry, client netip.Addr) []affinityEntry {
	var out []affinityEntry
	for _, e := range entries {
		if e.Key.Addr == client {
			out = append(out, e)
		}
	}
	return out
}

// guardedState is the guarded Service: LoadBalancer IPs 198.51.100.40
// and 2001:db8::40, NodePort 30040, ClusterIPs 10.96.0.40 and
// fd00:96::40, on pods 0-2 of which those from local on are on this node.
func guardedState(tp *netnstest.Topology, local int, ranges []string, opts ...svcOption) ServiceState {
	opts = append([]svcOption{
		withLoadBalancer(corev1.LoadBalancerIngress{IP: "198.51.100.40"}, corev1.LoadBalancerIngress{IP: "2001:db8::40"}),
		withSourceRanges(ranges...),
	}, opts...)
	svc := service("default", "guarded", []string{"10.96.0.40", "fd00:96::40"}, []string{"http:80"}, opts...)
	svc.Spec.Ports[0].NodePort = 30040
	return state(svc,
		slice(svc, "guarded-v4", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, remote(podEndpoints(tp, IPv4, 0, 1, 2), local)...),
		slice(svc, "guarded-v6", discoveryv1.AddressTypeIPv6, []string{"http:8080"}, remote(podEndpoints(tp, IPv6, 0, 1, 2), local)...))
}

func TestKernelTrafficPolicies(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 4)
	startPods(t, tp)
	k := newApplier(t, tp.Node)
	c := NewComputer()
	base := kernelSnapshot(tp, 0, 1, 2)
	apply(t, k, c.Compute(base))

	type want struct{ servers, sources []string }
	check := func(t *testing.T, name string, from *netnstest.NS, target string, w want) {
		t.Helper()
		got := spread(t, from, target, 30, false)
		if s := servers(got); !slices.Equal(s, w.servers) {
			t.Errorf("%s: servers %v, want %v", name, s, w.servers)
		}
		if s := sources(got); !slices.Equal(s, w.sources) {
			t.Errorf("%s: sources %v, want %v", name, s, w.sources)
		}
	}
	all := []string{"pod0", "pod1", "pod2"}
	client4, client6 := tp.ClientIPv4.String(), tp.ClientIPv6.String()

	t.Run("externalTrafficPolicy Local", func(t *testing.T) {
		check(t, "LoadBalancer IP from outside: local endpoint, client source kept", tp.Client, "198.51.100.40:80", want{[]string{"pod0"}, []string{client4}})
		check(t, "NodePort from outside: local endpoint, client source kept", tp.Client, "192.168.0.1:30040", want{[]string{"pod0"}, []string{client4}})
		check(t, "IPv6 LoadBalancer IP from outside", tp.Client, "[2001:db8::40]:80", want{[]string{"pod0"}, []string{client6}})
		check(t, "IPv6 NodePort from outside", tp.Client, "[fd00:1::1]:30040", want{[]string{"pod0"}, []string{client6}})
		check(t, "from a pod: any endpoint", tp.Pods[3].NS, "198.51.100.40:80", want{all, []string{"10.1.0.14"}})
		check(t, "from the node: any endpoint, masqueraded", tp.Node, "192.168.0.1:30040", want{all, []string{"10.1.0.1"}})
		check(t, "ClusterIP keeps Cluster policy", tp.Client, "10.96.0.40:80", want{all, []string{"10.1.0.1"}})

		apply(t, k, c.Compute(replaced(base, guardedState(tp, 0, []string{"192.168.0.0/30", "10.1.0.0/16", "fd00:1::/64"}, withExternalPolicyLocal()))))
		expectDropped(t, tp.Client, "198.51.100.40:80")
		expectDropped(t, tp.Client, "192.168.0.1:30040")
		expectDropped(t, tp.Client, "[2001:db8::40]:80")
		check(t, "no local endpoint, from a pod: still served", tp.Pods[3].NS, "198.51.100.40:80", want{all, []string{"10.1.0.14"}})
		check(t, "no local endpoint, from the node: still served", tp.Node, "192.168.0.1:30040", want{all, []string{"10.1.0.1"}})
	})

	t.Run("loadBalancerSourceRanges", func(t *testing.T) {
		// The client's 192.168.0.2 and fd00:1::2 are outside these.
		apply(t, k, c.Compute(replaced(base, guardedState(tp, 1, []string{"192.168.0.4/30", "fd00:2::/64"}))))
		expectDropped(t, tp.Client, "198.51.100.40:80")
		expectDropped(t, tp.Client, "[2001:db8::40]:80")
		check(t, "NodePort is not filtered", tp.Client, "192.168.0.1:30040", want{all, []string{"10.1.0.1"}})
		check(t, "ClusterIP is not filtered", tp.Client, "10.96.0.40:80", want{all, []string{"10.1.0.1"}})
		apply(t, k, c.Compute(replaced(base, guardedState(tp, 1, []string{"192.168.0.0/30", "fd00:1::/64"}))))
		check(t, "inside the ranges: served", tp.Client, "198.51.100.40:80", want{all, []string{"10.1.0.1"}})
		check(t, "IPv6 inside the ranges: served", tp.Client, "[2001:db8::40]:80", want{all, []string{"fd00:10::1"}})
	})

	t.Run("internalTrafficPolicy Local", func(t *testing.T) {
		apply(t, k, c.Compute(replaced(base, guardedState(tp, 1, nil, withInternalPolicyLocal()))))
		check(t, "ClusterIP from a pod: the local endpoint", tp.Pods[3].NS, "10.96.0.40:80", want{[]string{"pod0"}, []string{"10.1.0.14"}})
		check(t, "IPv6 ClusterIP from a pod", tp.Pods[3].NS, "[fd00:96::40]:80", want{[]string{"pod0"}, []string{"fd00:10::14"}})
		check(t, "LoadBalancer IP keeps Cluster policy", tp.Client, "198.51.100.40:80", want{all, []string{"10.1.0.1"}})
		apply(t, k, c.Compute(replaced(base, guardedState(tp, 0, nil, withInternalPolicyLocal()))))
		expectDropped(t, tp.Pods[3].NS, "10.96.0.40:80")
		expectDropped(t, tp.Pods[3].NS, "[fd00:96::40]:80")
	})

	t.Run("terminating endpoints while none is ready, ready ones when back", func(t *testing.T) {
		st := guardedState(tp, 3, nil)
		for _, sl := range st.Slices {
			for i := range sl.Endpoints {
				sl.Endpoints[i].Conditions.Ready = ptrTo(false)
				sl.Endpoints[i].Conditions.Terminating = ptrTo(i < 2)
				sl.Endpoints[i].Conditions.Serving = ptrTo(i < 2)
			}
		}
		apply(t, k, c.Compute(replaced(base, st)))
		check(t, "serving terminating endpoints", tp.Pods[3].NS, "10.96.0.40:80", want{[]string{"pod0", "pod1"}, []string{"10.1.0.14"}})
		check(t, "IPv6 too", tp.Pods[3].NS, "[fd00:96::40]:80", want{[]string{"pod0", "pod1"}, []string{"fd00:10::14"}})
		v4 := st.Slices[0].DeepCopy()
		v4.Endpoints[2].Conditions.Ready = ptrTo(true)
		apply(t, k, c.Compute(replaced(base, state(st.Service, v4, st.Slices[1]))))
		check(t, "the ready endpoint again", tp.Pods[3].NS, "10.96.0.40:80", want{[]string{"pod2"}, []string{"10.1.0.14"}})
	})

	t.Run("topology: endpoints hinted for this node's zone", func(t *testing.T) {
		st := guardedState(tp, 3, nil)
		for _, sl := range st.Slices {
			for i, zone := range []string{"zone-a", "zone-b", "zone-b"} {
				sl.Endpoints[i].Hints = &discoveryv1.EndpointHints{ForZones: []discoveryv1.ForZone{{Name: zone}}}
			}
		}
		snap := replaced(base, st)
		snap.NodeZone = "zone-b"
		apply(t, k, c.Compute(snap))
		check(t, "this zone's endpoints", tp.Pods[3].NS, "10.96.0.40:80", want{[]string{"pod1", "pod2"}, []string{"10.1.0.14"}})
		check(t, "IPv6 too", tp.Pods[3].NS, "[fd00:96::40]:80", want{[]string{"pod1", "pod2"}, []string{"fd00:10::14"}})
	})
}

func ptrTo[T any](v T) *T { return &v }
