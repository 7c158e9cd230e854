package dataplane

import (
	"flag"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

var update = flag.Bool("update", false, "rewrite golden files")

// golden compares got with testdata/name, or rewrites it with -update.
func golden(t *testing.T, name, got string) {
	t.Helper()
	path := filepath.Join("testdata", name)
	if *update {
		if err := os.WriteFile(path, []byte(got), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	want, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%v (run with -update to create it)", err)
	}
	if diff := cmp.Diff(string(want), got); diff != "" {
		t.Errorf("%s differs (-want +got):\n%s", path, diff)
	}
}

func TestComputeGolden(t *testing.T) {
	rs := Compute(exampleSnapshot())
	golden(t, "example.nft", rs.String())
	if got := Compute(exampleSnapshot()).String(); got != rs.String() {
		t.Error("Compute is not deterministic")
	}
}

func addr(s string) netip.Addr { return netip.MustParseAddr(s) }

func addrPort(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

func TestPacketFlow(t *testing.T) {
	tr := newTracer(Compute(exampleSnapshot()))
	outside, pod := addr("192.168.0.2"), addr("10.1.0.50")
	cases := []struct {
		name string
		p    packet
		want string
	}{
		{"ClusterIP from a pod keeps its source", packet{src: pod, dst: addr("10.96.0.10"), proto: TCP, dport: 80},
			"10.1.0.11:8080, 10.1.0.12:8080"},
		{"ClusterIP from outside the cluster is masqueraded", packet{src: outside, dst: addr("10.96.0.10"), proto: TCP, dport: 80},
			"10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"},
		{"second port by name", packet{src: pod, dst: addr("10.96.0.10"), proto: TCP, dport: 443},
			"10.1.0.11:8443, 10.1.0.12:8443"},
		{"hairpin is masqueraded", packet{src: addr("10.1.0.11"), dst: addr("10.96.0.10"), proto: TCP, dport: 80},
			"10.1.0.11:8080 (masqueraded), 10.1.0.12:8080"},
		{"unused ClusterIP port is rejected", packet{src: pod, dst: addr("10.96.0.10"), proto: TCP, dport: 81}, "rejected"},
		{"unused protocol on a used port is rejected", packet{src: pod, dst: addr("10.96.0.10"), proto: UDP, dport: 80}, "rejected"},
		{"UDP and TCP on the same port", packet{src: pod, dst: addr("10.96.0.53"), proto: UDP, dport: 53}, "10.1.0.21:5353"},
		{"TCP 53", packet{src: pod, dst: addr("10.96.0.53"), proto: TCP, dport: 53}, "10.1.0.21:5353"},
		{"IPv6 ClusterIP", packet{src: addr("fd00:10::99"), dst: addr("fd00:96::53"), proto: UDP, dport: 53}, "[fd00:10::21]:5353"},
		{"IPv6 from outside", packet{src: addr("fd00:1::2"), dst: addr("fd00:96::53"), proto: TCP, dport: 53}, "[fd00:10::21]:5353 (masqueraded)"},
		{"NodePort is masqueraded", packet{src: outside, dst: addr("192.168.0.1"), proto: TCP, dport: 30080},
			"10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"},
		{"NodePort from a pod is masqueraded too", packet{src: pod, dst: addr("192.168.0.1"), proto: TCP, dport: 30443},
			"10.1.0.11:8443 (masqueraded), 10.1.0.12:8443 (masqueraded)"},
		{"NodePort not on loopback", packet{src: addr("127.0.0.1"), dst: addr("127.0.0.1"), proto: TCP, dport: 30080, local: true}, "not handled"},
		{"NodePort without endpoints is rejected", packet{src: outside, dst: addr("192.168.0.1"), proto: TCP, dport: 30099}, "rejected"},
		{"ClusterIP without endpoints is rejected", packet{src: pod, dst: addr("10.96.0.99"), proto: TCP, dport: 80}, "rejected"},
		{"ClusterIP without endpoints, from the node", packet{src: addr("192.168.0.1"), dst: addr("10.96.0.99"), proto: TCP, dport: 80, local: true}, "rejected"},
		{"unused port from the node", packet{src: addr("192.168.0.1"), dst: addr("10.96.0.10"), proto: TCP, dport: 9, local: true}, "rejected"},
		{"ClusterIP from the node is masqueraded", packet{src: addr("192.168.0.1"), dst: addr("10.96.0.10"), proto: TCP, dport: 80, local: true},
			"10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"},
		{"externalIP", packet{src: outside, dst: addr("203.0.113.10"), proto: TCP, dport: 80},
			"10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"},
		{"externalIP other port is not ours", packet{src: outside, dst: addr("203.0.113.10"), proto: TCP, dport: 22}, "not handled"},
		{"LoadBalancer IP, terminating endpoints as a fallback", packet{src: outside, dst: addr("198.51.100.20"), proto: TCP, dport: 80},
			"10.1.0.31:8080 (masqueraded)"},
		{"LoadBalancer IP in Proxy mode is skipped", packet{src: outside, dst: addr("198.51.100.21"), proto: TCP, dport: 80}, "not handled"},
		{"headless is not proxied", packet{src: pod, dst: addr("10.96.0.1"), proto: TCP, dport: 80}, "not handled"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			if got := tr.trace(c.p).String(); got != c.want {
				t.Errorf("got %s, want %s", got, c.want)
			}
		})
	}
}

func TestConfigChangesMasquerade(t *testing.T) {
	snap := exampleSnapshot()
	snap.Config.MasqueradeAll = true
	tr := newTracer(Compute(snap))
	got := tr.trace(packet{src: addr("10.1.0.50"), dst: addr("10.96.0.10"), proto: TCP, dport: 80}).String()
	if got != "10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)" {
		t.Errorf("masqueradeAll: %s", got)
	}

	snap = exampleSnapshot()
	snap.Config.LocalTrafficDetection = &proxyv1alpha1.LocalTrafficDetection{Mode: proxyv1alpha1.DetectLocalByInterfaceNamePrefix, InterfaceNamePrefix: "veth"}
	tr = newTracer(Compute(snap))
	for iif, want := range map[string]string{"veth12": "10.1.0.11:8080, 10.1.0.12:8080", "eth0": "10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"} {
		if got := tr.trace(packet{src: addr("192.168.0.2"), dst: addr("10.96.0.10"), proto: TCP, dport: 80, iifname: iif}).String(); got != want {
			t.Errorf("from %s: %s, want %s", iif, got, want)
		}
	}

	snap = exampleSnapshot()
	snap.Config.NodePortAddresses = []proxyv1alpha1.CIDR{"127.0.0.0/8"}
	tr = newTracer(Compute(snap))
	if got := tr.trace(packet{src: addr("192.168.0.2"), dst: addr("192.168.0.1"), proto: TCP, dport: 30080}).String(); got != "not handled" {
		t.Errorf("NodePort on an address outside nodePortAddresses: %s", got)
	}
	if got := tr.trace(packet{src: addr("127.0.0.1"), dst: addr("127.0.0.1"), proto: TCP, dport: 30080, local: true}).String(); !strings.HasPrefix(got, "10.1.0.11:8080") {
		t.Errorf("NodePort on 127.0.0.1 when configured: %s", got)
	}

	snap = exampleSnapshot()
	snap.Config.AllowedExternalIPCIDRs = []proxyv1alpha1.CIDR{"198.18.0.0/15"}
	rs := Compute(snap)
	if got := newTracer(rs).trace(packet{src: addr("192.168.0.2"), dst: addr("203.0.113.10"), proto: TCP, dport: 80}).String(); got != "not handled" {
		t.Errorf("externalIP outside allowedExternalIPCIDRs: %s", got)
	}
	if p := rs.Problems(); !slices.ContainsFunc(p, func(s string) bool { return strings.Contains(s, "outside allowedExternalIPCIDRs") }) {
		t.Errorf("no problem reported for the refused externalIP: %q", p)
	}
}

func TestProblemsAndConflicts(t *testing.T) {
	bad := service("default", "bad", []string{"10.96.0.70"}, []string{"80", "81"},
		withExternalIPs("not-an-ip", "fd00::1", "10.96.0.10"))
	bad.Spec.Ports[1].Protocol = "QUIC"
	other := service("default", "zz-other", []string{"10.96.0.71"}, []string{"80"}, withExternalIPs("203.0.113.10"))
	snap := exampleSnapshot()
	for _, svc := range []*corev1.Service{bad, other} {
		snap.Services[types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}] = state(svc,
			slice(svc, svc.Name, discoveryv1.AddressTypeIPv4, []string{"8080"}, ready("10.1.0.70")))
	}
	rs := Compute(snap)
	want := []string{
		`default/bad: spec.externalIPs[0]: "not-an-ip" is not an IP address; skipped`,
		`default/bad: spec.externalIPs[1]: fd00::1 is IPv6 but the Service has no IPv6 ClusterIP; skipped`,
		`default/bad: spec.ports[1].protocol: unknown protocol "QUIC"; port skipped`,
		`default/bad: externalIP 10.96.0.10 port 80/TCP is also claimed by default/web; not programmed for this Service`,
		`default/zz-other: externalIP 203.0.113.10 port 80/TCP is also claimed by default/web; not programmed for this Service`,
	}
	if diff := cmp.Diff(want, rs.Problems()); diff != "" {
		t.Errorf("problems (-want +got):\n%s", diff)
	}
	tr := newTracer(rs)
	// The valid parts of the bad Service work, and the Services it
	// collides with keep their frontends.
	for _, c := range []struct {
		p    packet
		want string
	}{
		{packet{src: addr("10.1.0.50"), dst: addr("10.96.0.70"), proto: TCP, dport: 80}, "10.1.0.70:8080"},
		{packet{src: addr("10.1.0.50"), dst: addr("10.96.0.10"), proto: TCP, dport: 80}, "10.1.0.11:8080, 10.1.0.12:8080"},
		{packet{src: addr("10.1.0.50"), dst: addr("203.0.113.10"), proto: TCP, dport: 80}, "10.1.0.11:8080 (masqueraded), 10.1.0.12:8080 (masqueraded)"},
	} {
		if got := tr.trace(c.p).String(); got != c.want {
			t.Errorf("%v: got %s, want %s", c.p, got, c.want)
		}
	}
}

func TestIgnoredServices(t *testing.T) {
	ext := service("default", "ext", []string{"10.96.0.80"}, []string{"80"})
	ext.Spec.Type = corev1.ServiceTypeExternalName
	other := service("default", "other-proxy", []string{"10.96.0.81"}, []string{"80"}, withLabel("service.kubernetes.io/service-proxy-name", "foo"))
	hl := service("default", "hl", []string{"10.96.0.82"}, []string{"80"}, withLabel("service.kubernetes.io/headless", ""))
	snap := newSnapshot(state(ext), state(other), state(hl))
	for key, r := range Compute(snap).Services {
		if len(r.Chains)+len(r.Elements)+len(r.Problems) != 0 {
			t.Errorf("%s is programmed: %+v", key, r)
		}
	}
}

// TestIncrementalMatchesFresh changes Services one by one through one
// Computer and checks that each result is what a fresh computation gives,
// packet for packet (index runs may differ, what they lead to may not).
func TestIncrementalMatchesFresh(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	snap := syntheticSnapshot(60, 3, true)
	c := NewComputer()
	c.Compute(snap)
	for step := range 200 {
		i := rng.IntN(80)
		key := syntheticKey(i)
		switch rng.IntN(4) {
		case 0:
			delete(snap.Services, key)
		default:
			snap.Services[key] = syntheticServiceWith(i, 1+rng.IntN(6), rng.IntN(5), rng.IntN(2) == 0)
		}
		var inc *Ruleset
		if step%2 == 0 {
			inc = c.ComputeChanged(snap, []types.NamespacedName{key})
		} else {
			inc = c.Compute(snap)
		}
		fresh := Compute(snap)
		if diff := cmp.Diff(flows(fresh, snap), flows(inc, snap)); diff != "" {
			t.Fatalf("step %d: incremental result differs from fresh (-fresh +incremental):\n%s", step, diff)
		}
		checkValid(t, inc)
	}
}

// flows traces a packet from a pod and from outside to every ClusterIP
// frontend of the snapshot.
func flows(rs *Ruleset, snap *Snapshot) map[string]string {
	tr := newTracer(rs)
	out := map[string]string{}
	for _, st := range snap.Services {
		for _, p := range st.Service.Spec.Ports {
			for _, src := range []string{"10.1.0.50", "192.168.0.2"} {
				pk := packet{src: addr(src), dst: addr(st.Service.Spec.ClusterIP), proto: TCP, dport: uint16(p.Port)}
				out[st.Service.Name+" from "+src] = tr.trace(pk).String()
			}
		}
	}
	return out
}

// checkValid checks what the kernel would refuse: duplicate chains or
// elements, references to chains or indexes that do not exist.
func checkValid(t *testing.T, rs *Ruleset) {
	t.Helper()
	chains := map[string]bool{}
	for _, c := range allChains(rs) {
		if chains[c.Name] {
			t.Fatalf("chain %s twice", c.Name)
		}
		if len(c.Name) > 255 {
			t.Fatalf("chain name too long: %s", c.Name)
		}
		chains[c.Name] = true
	}
	sets := map[string]*Set{}
	for _, s := range rs.Base.Sets {
		sets[s.Name] = s
	}
	seen := map[string]map[Key]bool{}
	indexes := map[string]map[uint32]bool{}
	for _, key := range rs.ServiceKeys() {
		for _, e := range rs.Services[key].Elements {
			if sets[e.Set] == nil {
				t.Fatalf("%s: element of unknown set %s", key, e.Set)
			}
			if seen[e.Set] == nil {
				seen[e.Set], indexes[e.Set] = map[Key]bool{}, map[uint32]bool{}
			}
			if seen[e.Set][e.Key] && sets[e.Set].Data != DataNone {
				t.Fatalf("%s: element %v of %s twice", key, e.Key, e.Set)
			}
			seen[e.Set][e.Key] = true
			indexes[e.Set][e.Key.Index] = true
			if (e.Verdict.Kind == VerdictGoto || e.Verdict.Kind == VerdictJump) && !chains[e.Verdict.Chain] {
				t.Fatalf("%s: element points to missing chain %s", key, e.Verdict.Chain)
			}
		}
	}
	for _, c := range allChains(rs) {
		for _, r := range c.Rules {
			for _, s := range r.Stmts {
				switch s := s.(type) {
				case VerdictStmt:
					if s.Verdict.Chain != "" && !chains[s.Verdict.Chain] {
						t.Fatalf("chain %s jumps to missing %s", c.Name, s.Verdict.Chain)
					}
				case DNATRandom:
					for i := range s.Count {
						if !indexes[s.Map][s.Offset+i] {
							t.Fatalf("chain %s draws index %d missing from %s", c.Name, s.Offset+i, s.Map)
						}
					}
				}
			}
		}
	}
}

// FuzzCompute feeds Compute Services and slices built from random bytes:
// it must never panic and its output must always be a valid table.
func FuzzCompute(f *testing.F) {
	f.Add([]byte("seed-one"), []byte{1, 2, 3})
	f.Add([]byte{0xff, 0, 0x10, 0x80, 7, 7, 7}, []byte{9, 200, 13, 0})
	f.Fuzz(func(t *testing.T, a, b []byte) {
		snap := exampleSnapshot()
		r := byteReader{data: append(a, b...)}
		for n := range 1 + r.next()%6 {
			ips := [][]string{{"10.96.1." + r.num()}, {"10.96.0.10"}, {"fd00:96::" + r.num(), "10.96.2." + r.num()}, {r.word()}, {"None"}}[r.next()%5]
			svc := service("fuzz", "svc"+string(rune('a'+n)), ips, []string{"p:" + r.num() + "/" + []string{"TCP", "UDP", "SCTP", "X", ""}[r.next()%5], r.num()})
			if r.next()%2 == 0 {
				svc.Spec.Type = corev1.ServiceTypeNodePort
				svc.Spec.Ports[0].NodePort = int32(r.next())<<8 | int32(r.next())
			}
			if r.next()%2 == 0 {
				svc.Spec.ExternalIPs = []string{[]string{"203.0.113.10", "10.96.0.10", "x", "fd00::9", "198.51.100.1"}[r.next()%5]}
			}
			var slices []*discoveryv1.EndpointSlice
			for range r.next() % 3 {
				sl := slice(svc, "s"+r.num(), []discoveryv1.AddressType{"IPv4", "IPv6", "FQDN"}[r.next()%3], []string{"p:" + r.num() + "/TCP", r.num()})
				for range r.next() % 5 {
					sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
						Addresses:  []string{[]string{"10.1.0." + r.num(), "fd00:10::" + r.num(), r.word(), "::ffff:10.1.0.1"}[r.next()%4]},
						Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(r.next()%2 == 0), Serving: ptr.To(r.next()%2 == 0), Terminating: ptr.To(r.next()%2 == 0)},
					})
				}
				if r.next()%4 == 0 {
					sl.Ports[0].Port = nil
				}
				slices = append(slices, sl)
			}
			snap.Services[types.NamespacedName{Namespace: "fuzz", Name: svc.Name}] = state(svc, slices...)
		}
		rs := Compute(snap)
		checkValid(t, rs)
		_ = rs.String()
	})
}

type byteReader struct {
	data []byte
	pos  int
}

func (r *byteReader) next() int {
	if len(r.data) == 0 {
		return 0
	}
	b := r.data[r.pos%len(r.data)]
	r.pos++
	return int(b)
}

func (r *byteReader) num() string {
	return strings.TrimLeft(string(rune('0'+r.next()%10))+string(rune('0'+r.next()%10)), "0") + "1"
}

func (r *byteReader) word() string {
	return []string{"", "1.2.3", "10.96.0.300", "::1%eth0", "fe80::1"}[r.next()%5]
}

// TestPortSummaries checks what the agent reads of each Service: frontends
// and endpoints per port and family, local endpoint counts, and the health
// check port of LoadBalancer Services with externalTrafficPolicy Local.
func TestPortSummaries(t *testing.T) {
	snap := exampleSnapshot()
	lbKey := types.NamespacedName{Namespace: "default", Name: "lb"}
	lb := snap.Services[lbKey].Service.DeepCopy()
	lb.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	lb.Spec.HealthCheckNodePort = 32000
	snap.Services[lbKey] = ServiceState{Service: lb, Slices: snap.Services[lbKey].Slices}
	rs := Compute(snap)

	web := rs.Services[types.NamespacedName{Namespace: "default", Name: "web"}]
	if web.HealthCheckNodePort != 0 {
		t.Errorf("web: health check port %d, want none", web.HealthCheckNodePort)
	}
	want := []PortSummary{
		{Family: IPv4, Proto: TCP, NodePort: 30080, LocalEndpoints: 2,
			Frontends: []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:80"), netip.MustParseAddrPort("203.0.113.10:80")},
			Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.1.0.11:8080"), netip.MustParseAddrPort("10.1.0.12:8080")}},
		{Family: IPv4, Proto: TCP, NodePort: 30443, LocalEndpoints: 2,
			Frontends: []netip.AddrPort{netip.MustParseAddrPort("10.96.0.10:443"), netip.MustParseAddrPort("203.0.113.10:443")},
			Endpoints: []netip.AddrPort{netip.MustParseAddrPort("10.1.0.11:8443"), netip.MustParseAddrPort("10.1.0.12:8443")}},
	}
	if diff := cmp.Diff(want, web.Ports, cmpopts.EquateComparable(netip.AddrPort{})); diff != "" {
		t.Errorf("web ports (-want +got):\n%s", diff)
	}
	dns := rs.Services[types.NamespacedName{Namespace: "kube-system", Name: "kube-dns"}]
	var udp []netip.AddrPort
	for _, p := range dns.Ports {
		if p.Proto == UDP {
			udp = append(udp, p.Endpoints...)
		}
	}
	if want := []netip.AddrPort{netip.MustParseAddrPort("10.1.0.21:5353"), netip.MustParseAddrPort("[fd00:10::21]:5353")}; !slices.Equal(udp, want) {
		t.Errorf("kube-dns UDP endpoints %v, want %v", udp, want)
	}
	// lb's only local endpoint is terminating: the rules fall back to it,
	// but the health check must fail so load balancers drain the node.
	got := rs.Services[lbKey]
	if got.HealthCheckNodePort != 32000 || got.LocalEndpoints() != 0 {
		t.Errorf("lb: health check port %d with %d local endpoints, want 32000 with 0 (the terminating endpoint does not count)", got.HealthCheckNodePort, got.LocalEndpoints())
	}
	if eps := got.Ports[0].Endpoints; len(eps) != 1 {
		t.Errorf("lb: endpoints %v, want the terminating one (the fallback)", eps)
	}
	lb = lb.DeepCopy()
	snap.Services[lbKey] = ServiceState{Service: lb, Slices: []*discoveryv1.EndpointSlice{
		slice(lb, "lb-1", discoveryv1.AddressTypeIPv4, []string{"8080"}, terminating("10.1.0.31"), ready("10.1.0.32"), ep{addr: "10.1.0.33", node: testNode}),
	}}
	if got := Compute(snap).Services[lbKey]; got.LocalEndpoints() != 1 {
		t.Errorf("lb with one ready, one terminating and one unready endpoint: %d local endpoints, want 1", got.LocalEndpoints())
	}
}
