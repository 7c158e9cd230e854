package e2e

// Scenarios after the sig-network Service e2e suite (test/e2e/network/
// service.go upstream): multi-port Services and named target ports, one
// port number on two protocols, NodePort from outside with masquerade,
// hairpin, Services without endpoints and unused ClusterIP ports refused
// at once, externalIPs, and IPv6 (dual-stack and single-stack).

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

// TestServiceMultiPortNamedTargetPort: one Service with two ports, 80 to
// the pods' port named "http" (their HTTP server on 80) and 8081 to the
// numeric 8080 (their TCP echo), sends each port to its own target port:
// an HTTP answer on 80 and an echo greeting on 8081 from every endpoint,
// the pod's source kept, and the DNAT target port in conntrack is the
// resolved one. It also checks the node's own traffic: from every node,
// both endpoints (on two nodes) answer, the node's source masqueraded to
// the address of the interface towards the endpoint.
func TestServiceMultiPortNamedTargetPort(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := []*cluster.Pod{c.Nodes[0].Pods[1], c.Nodes[1].Pods[0]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "multiport"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			tcpPort("http", 80, intstr.FromString("http")),
			tcpPort("echo", 8081, intstr.FromInt32(cluster.EchoPort)),
		}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	vip := svc.Spec.ClusterIP

	client := c.Nodes[2].Pods[1]
	for name, r := range reaches(t, "pod to port 80 (named targetPort http) over HTTP",
		askHTTP(client.NS, "http://"+hostPort(vip, 80)+"/"), backends...) {
		if r.Source != client.IPv4 {
			t.Errorf("HTTP: %s saw the request come from %s, want the pod's own %s", name, r.Source, client.IPv4)
		}
	}
	for name, r := range reaches(t, "pod to port 8081 (targetPort 8080)", askTCP(client.NS, hostPort(vip, 8081)), backends...) {
		if r.Source != client.IPv4 {
			t.Errorf("echo: %s saw the request come from %s, want the pod's own %s", name, r.Source, client.IPv4)
		}
	}
	// The DNAT target of each port, as conntrack on the client's node
	// recorded it.
	svcCheckDNAT(t, c, client, "tcp", hostPort(vip, 8081), cluster.EchoPort)
	svcCheckHTTPDNAT(t, c, client, hostPort(vip, 80), cluster.HTTPPort)

	// The node's own traffic, to endpoints on two nodes.
	for _, n := range c.Nodes {
		for name, r := range reaches(t, n.Name+" to port 8081", askTCP(n.NS, hostPort(vip, 8081)), backends...) {
			if want := svcMasqueradedSource(n, svcPod(t, c, name), false); r.Source != want {
				t.Errorf("%s to port 8081: %s saw the request come from %s, want %s", n.Name, name, r.Source, want)
			}
		}
		reaches(t, n.Name+" to port 80 over HTTP", askHTTP(n.NS, "http://"+hostPort(vip, 80)+"/"), backends...)
	}
}

// TestServiceNamedTargetPortPerSlice: a named targetPort takes its number
// from each EndpointSlice, not from the Service: with one slice of pods
// whose port is 8080 and another whose port (same name) is 5353, as in a
// rollout that renumbers the container port, every flow goes to its
// endpoint's own port, as conntrack on the client's node shows.
func TestServiceNamedTargetPortPerSlice(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "renumbered"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{tcpPort("web", 80, intstr.FromString("web"))}},
	})
	old, renumbered := c.Nodes[0].Pods[0], c.Nodes[1].Pods[1]
	for _, s := range []struct {
		name string
		pod  *cluster.Pod
		port int32
	}{{"old", old, cluster.EchoPort}, {"new", renumbered, cluster.DNSPort}} {
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: svc.Name + "-" + s.name, Labels: map[string]string{
				discoveryv1.LabelServiceName: svc.Name, discoveryv1.LabelManagedBy: "e2e.nftproxy.io"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("web"), Port: ptr.To(s.port), Protocol: ptr.To(corev1.ProtocolTCP)}},
			Endpoints: []discoveryv1.Endpoint{{
				Addresses:  []string{s.pod.IPv4.String()},
				Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true), Serving: ptr.To(true), Terminating: ptr.To(false)},
				NodeName:   ptr.To(s.pod.Node.Name),
			}},
		}
		if err := c.API.Create(context.Background(), slice); err != nil {
			t.Fatal(err)
		}
	}
	vip := hostPort(svc.Spec.ClusterIP, 80)
	client := c.Nodes[2].Pods[0]
	reaches(t, "pod to the Service", askTCP(client.NS, vip), old, renumbered)
	want := map[string]uint16{old.Name: cluster.EchoPort, renumbered.Name: cluster.DNSPort}
	seen := map[string]bool{}
	for i := 0; len(seen) < 2; i++ {
		if i == 40 {
			t.Fatalf("40 connections reached only %v", keys(seen))
		}
		conn, r, err := client.DialTCP(vip, answer)
		if err != nil {
			t.Fatal(err)
		}
		svcCheckConntrack(t, c, client, "tcp", conn.LocalAddr(), vip, r.Server, want[r.Server])
		_ = conn.Close()
		seen[r.Server] = true
	}
}

// TestServiceSamePortTCPAndUDP: a kube-dns-like Service, 53/UDP to the
// pods' "dns" and 53/TCP to their "dns-tcp" (both 5353), answers a pod on
// both protocols from every endpoint, each flow DNATed to the endpoint
// that answered and to port 5353 on its own protocol; and a pod's queries
// from one UDP socket stay on one endpoint (one conntrack flow).
func TestServiceSamePortTCPAndUDP(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := []*cluster.Pod{c.Nodes[0].Pods[0], c.Nodes[2].Pods[1]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "kube-dns"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			udpPort("dns", 53, intstr.FromString("dns")),
			tcpPort("dns-tcp", 53, intstr.FromString("dns-tcp")),
		}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	vip := hostPort(svc.Spec.ClusterIP, 53)

	client := c.Nodes[1].Pods[0]
	for proto, a := range map[string]ask{"udp": askUDP(client.NS, vip), "tcp": askTCP(client.NS, vip)} {
		for name, r := range reaches(t, "pod to 53/"+proto, a, backends...) {
			if r.Source != client.IPv4 {
				t.Errorf("53/%s: %s saw the query come from %s, want the pod's own %s", proto, name, r.Source, client.IPv4)
			}
		}
		for range 4 {
			svcCheckDNAT(t, c, client, proto, vip, cluster.DNSPort)
		}
	}

	// One UDP socket is one flow: every query lands where the first did.
	conn, err := client.DialUDP(vip, answer)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	first, err := conn.Ask()
	if err != nil {
		t.Fatal(err)
	}
	for range 10 {
		r, err := conn.Ask()
		if err != nil {
			t.Fatal(err)
		}
		if r.Server != first.Server {
			t.Fatalf("queries from one UDP socket reached %s, then %s", first.Server, r.Server)
		}
	}
}

// TestServiceNodePortFromOutside: a NodePort Service with endpoints on two
// of the three nodes answers the client outside the cluster on every
// node's IPv4 address, over TCP and UDP, spread over all endpoints, also
// on the node without one. Under the default externalTrafficPolicy
// Cluster the client's source is masqueraded: the backend sees the
// address of the receiving node's interface towards it (its fabric
// address, or its pod bridge for a local endpoint), never the client's.
func TestServiceNodePortFromOutside(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := []*cluster.Pod{c.Nodes[0].Pods[0], c.Nodes[1].Pods[1]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "nodeport"},
		Spec: corev1.ServiceSpec{
			Type: corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{
				tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort)),
				udpPort("udp", 80, intstr.FromInt32(cluster.EchoPort)),
			},
		},
	})
	if p := svc.Spec.ExternalTrafficPolicy; p != corev1.ServiceExternalTrafficPolicyCluster {
		t.Fatalf("externalTrafficPolicy defaulted to %q, want Cluster", p)
	}
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))

	for _, sp := range svc.Spec.Ports {
		for _, n := range c.Nodes {
			addr := hostPort(n.IPv4, sp.NodePort)
			a := askTCP(c.Client, addr)
			if sp.Protocol == corev1.ProtocolUDP {
				a = askUDP(c.Client, addr)
			}
			what := fmt.Sprintf("client to %s NodePort %s/%d", n.Name, sp.Protocol, sp.NodePort)
			for name, r := range reaches(t, what, a, backends...) {
				if want := svcMasqueradedSource(n, svcPod(t, c, name), false); r.Source != want {
					t.Errorf("%s: %s saw the request come from %s, want %s (masqueraded, not the client's %s)",
						what, name, r.Source, want, cluster.ClientIPv4)
				}
			}
		}
	}
}

// TestServiceHairpin: a pod reaching a Service whose only endpoint is
// itself gets its own answer, over TCP and UDP and on both families, and
// the source it sees is not its own but its node's pod bridge address
// (masqueraded, as kube-proxy's hairpin rule does: otherwise the answer
// would go straight back to itself, bypassing the reverse DNAT). Another
// pod on the same node keeps its source: the masquerade is for hairpin
// traffic only.
func TestServiceHairpin(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	self, neighbour := c.Nodes[1].Pods[0], c.Nodes[1].Pods[1]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "hairpin"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Ports: []corev1.ServicePort{
				tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort)),
				udpPort("udp", 80, intstr.FromInt32(cluster.EchoPort)),
			},
		},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(self))

	for _, family := range []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol} {
		v6 := family == corev1.IPv6Protocol
		vip := hostPort(clusterIP(t, svc, family), 80)
		own, bridge := self.IPv4, svcBridgeIP(self.Node, v6)
		neighbourIP := neighbour.IPv4
		if v6 {
			own, neighbourIP = self.IPv6, neighbour.IPv6
		}
		for _, proto := range []string{"tcp", "udp"} {
			a, b := askTCP(self.NS, vip), askTCP(neighbour.NS, vip)
			if proto == "udp" {
				a, b = askUDP(self.NS, vip), askUDP(neighbour.NS, vip)
			}
			what := fmt.Sprintf("%s to itself through %s/%s", self.Name, vip, proto)
			r := reaches(t, what, a, self)[self.Name]
			if r.Source == own {
				t.Errorf("%s: it saw its own address %s as the source: hairpin traffic not masqueraded", what, own)
			} else if r.Source != bridge {
				t.Errorf("%s: it saw the source %s, want its node's pod bridge %s", what, r.Source, bridge)
			}
			what = fmt.Sprintf("%s to %s through %s/%s", neighbour.Name, self.Name, vip, proto)
			if r := reaches(t, what, b, self)[self.Name]; r.Source != neighbourIP {
				t.Errorf("%s: source %s, want the pod's own %s", what, r.Source, neighbourIP)
			}
		}
	}
}

// TestServiceNoEndpointsRefused: NodePort Services without any
// EndpointSlice, with an empty one, and with only unready endpoints
// refuse new connections at once (a TCP reset or ICMP unreachable within
// a second, not a timeout), over TCP and UDP and on both families, from a
// pod to the ClusterIPs and from the client to every node's NodePort.
// Once the unready endpoints turn ready the same frontends answer (so the
// NodePorts are programmed, and the refusal is the proxy's), and when
// they turn unready again they refuse again.
func TestServiceNoEndpointsRefused(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	newService := func(name string) *corev1.Service {
		return createService(t, c, ns, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{
				Type:           corev1.ServiceTypeNodePort,
				IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
				IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
				Ports: []corev1.ServicePort{
					tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort)),
					udpPort("udp", 80, intstr.FromInt32(cluster.EchoPort)),
				},
			},
		})
	}
	noSlice, emptySlice, unready := newService("no-slice"), newService("empty-slice"), newService("unready")
	setEndpoints(t, c, emptySlice, nil)
	pods := []*cluster.Pod{c.Nodes[0].Pods[1], c.Nodes[2].Pods[0]}
	allUnready := []cluster.Endpoint{{Pod: pods[0], State: cluster.Unready}, {Pod: pods[1], State: cluster.Unready}}
	setEndpoints(t, c, unready, allUnready)

	client := c.Nodes[1].Pods[1]
	for _, svc := range []*corev1.Service{noSlice, emptySlice, unready} {
		for what, a := range svcFrontends(t, c, svc, client) {
			refused(t, what, a)
		}
	}

	setEndpoints(t, c, unready, cluster.ReadyPods(pods...))
	for what, a := range svcFrontends(t, c, unready, client) {
		reaches(t, what+", its endpoints ready", a, pods...)
	}
	setEndpoints(t, c, unready, allUnready)
	for what, a := range svcFrontends(t, c, unready, client) {
		refused(t, what+", its endpoints unready again", a)
	}
}

// svcFrontends is every way in to svc, by name: from pod to each
// ClusterIP, from the client to each address of every node on the
// NodePort, for each port.
func svcFrontends(t *testing.T, c *cluster.Cluster, svc *corev1.Service, pod *cluster.Pod) map[string]ask {
	t.Helper()
	out := map[string]ask{}
	add := func(what string, from *netnstest.NS, proto corev1.Protocol, addr string) {
		what = fmt.Sprintf("%s %s/%s", what, addr, strings.ToLower(string(proto)))
		if proto == corev1.ProtocolTCP {
			out[what] = askTCP(from, addr)
		} else {
			out[what] = askUDP(from, addr)
		}
	}
	for _, sp := range svc.Spec.Ports {
		for _, ip := range svc.Spec.ClusterIPs {
			add(fmt.Sprintf("%s to %s ClusterIP", pod.Name, svc.Name), pod.NS, sp.Protocol, hostPort(ip, sp.Port))
		}
		if sp.NodePort == 0 {
			continue
		}
		for _, n := range c.Nodes {
			for _, ip := range []netip.Addr{n.IPv4, n.IPv6} {
				add(fmt.Sprintf("client to %s NodePort on %s", svc.Name, n.Name), c.Client, sp.Protocol, hostPort(ip, sp.NodePort))
			}
		}
	}
	return out
}

// TestServiceUnusedClusterIPPortRefused: a ClusterIP answers only its
// Service's ports: another port, or a defined port number on the other
// protocol, is refused at once (reset or port unreachable, not a timeout:
// it is never routed off the node to the gateway, which would drop it),
// over TCP and UDP, on both families' ClusterIPs, from a pod and from a
// node; the defined ports answer.
func TestServiceUnusedClusterIPPortRefused(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := []*cluster.Pod{c.Nodes[0].Pods[0], c.Nodes[1].Pods[0]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "ports"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Ports: []corev1.ServicePort{
				tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort)),
				udpPort("dns", 53, intstr.FromInt32(cluster.DNSPort)),
			},
		},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))

	for _, vip := range svc.Spec.ClusterIPs {
		for _, from := range []struct {
			name string
			ns   *netnstest.NS
		}{{"pod", c.Nodes[2].Pods[0].NS}, {"node", c.Nodes[2].NS}} {
			to := func(port int32) string { return hostPort(vip, port) }
			reaches(t, from.name+" to "+to(80)+"/tcp", askTCP(from.ns, to(80)), backends...)
			reaches(t, from.name+" to "+to(53)+"/udp", askUDP(from.ns, to(53)), backends...)
			refused(t, from.name+" to unused "+to(81)+"/tcp", askTCP(from.ns, to(81)))
			refused(t, from.name+" to unused "+to(cluster.EchoPort)+"/tcp (the target port)", askTCP(from.ns, to(cluster.EchoPort)))
			refused(t, from.name+" to "+to(53)+"/tcp (53 is UDP only)", askTCP(from.ns, to(53)))
			refused(t, from.name+" to "+to(80)+"/udp (80 is TCP only)", askUDP(from.ns, to(80)))
			refused(t, from.name+" to unused "+to(cluster.DNSPort)+"/udp", askUDP(from.ns, to(cluster.DNSPort)))
		}
	}
}

// TestServiceExternalIPs: a Service with spec.externalIPs 203.0.113.10 (a
// range the client routes to node0) answers the client on that IP and
// port, over TCP and UDP, from every endpoint, masqueraded to node0's
// address towards each (externalTrafficPolicy Cluster); a pod on another
// node reaches the externalIP too (caught on its own node), spread over
// every endpoint. Another port of the externalIP is not the Service's.
func TestServiceExternalIPs(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	const externalIP = "203.0.113.10"
	if !cluster.ExternalRanges[0].Contains(netip.MustParseAddr(externalIP)) {
		t.Fatalf("%s is not in %v", externalIP, cluster.ExternalRanges)
	}
	backends := []*cluster.Pod{c.Nodes[0].Pods[1], c.Nodes[1].Pods[0], c.Nodes[2].Pods[1]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "external"},
		Spec: corev1.ServiceSpec{
			ExternalIPs: []string{externalIP},
			Ports: []corev1.ServicePort{
				tcpPort("tcp", 8000, intstr.FromInt32(cluster.EchoPort)),
				udpPort("udp", 8000, intstr.FromInt32(cluster.EchoPort)),
			},
		},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	addr := hostPort(externalIP, 8000)
	via := c.Nodes[0] // where the client's route sends the external range

	pod := c.Nodes[2].Pods[0]
	for _, proto := range []string{"tcp", "udp"} {
		a, fromPod := askTCP(c.Client, addr), askTCP(pod.NS, addr)
		if proto == "udp" {
			a, fromPod = askUDP(c.Client, addr), askUDP(pod.NS, addr)
		}
		what := "client to externalIP " + addr + "/" + proto
		for name, r := range reaches(t, what, a, backends...) {
			if want := svcMasqueradedSource(via, svcPod(t, c, name), false); r.Source != want {
				t.Errorf("%s: %s saw the request come from %s, want %s (masqueraded, not the client's %s)",
					what, name, r.Source, want, cluster.ClientIPv4)
			}
		}
		reaches(t, pod.Name+" to externalIP "+addr+"/"+proto, fromPod, backends...)
	}
	// The externalIP is not a ClusterIP: the proxy claims only the
	// Service's port, so another port of it is none of the proxy's
	// business (node0 routes it on to its gateway, which drops it).
	dropped(t, "client to externalIP, an unused port", askTCP(c.Client, hostPort(externalIP, 8001)))
}

// TestServiceIPv6: a dual-stack NodePort Service (RequireDualStack,
// IPv4 then IPv6) gets a ClusterIP of each family, and its IPv6 ClusterIP
// answers a pod from every endpoint with the pod's IPv6 source kept (its
// IPv4 ClusterIP too, with the IPv4 source); its NodePort answers the
// client on every node's IPv6 address, masqueraded to the node's IPv6
// address towards the endpoint. A single-stack IPv6 Service gets only an
// IPv6 ClusterIP, which answers pods (source kept) and nodes.
func TestServiceIPv6(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := []*cluster.Pod{c.Nodes[0].Pods[1], c.Nodes[2].Pods[0]}
	dual := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "dual"},
		Spec: corev1.ServiceSpec{
			Type:           corev1.ServiceTypeNodePort,
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			IPFamilies:     []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol},
			Ports: []corev1.ServicePort{
				tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort)),
				udpPort("udp", 80, intstr.FromInt32(cluster.EchoPort)),
			},
		},
	})
	if len(dual.Spec.ClusterIPs) != 2 {
		t.Fatalf("dual-stack Service got ClusterIPs %v, want one per family", dual.Spec.ClusterIPs)
	}
	setEndpoints(t, c, dual, cluster.ReadyPods(backends...))

	client := c.Nodes[1].Pods[1]
	for _, family := range []corev1.IPFamily{corev1.IPv6Protocol, corev1.IPv4Protocol} {
		src := client.IPv4
		if family == corev1.IPv6Protocol {
			src = client.IPv6
		}
		vip := hostPort(clusterIP(t, dual, family), 80)
		for proto, a := range map[string]ask{"tcp": askTCP(client.NS, vip), "udp": askUDP(client.NS, vip)} {
			what := "pod to " + vip + "/" + proto
			for name, r := range reaches(t, what, a, backends...) {
				if r.Source != src {
					t.Errorf("%s: %s saw the request come from %s, want the pod's own %s", what, name, r.Source, src)
				}
			}
		}
	}
	for _, sp := range dual.Spec.Ports {
		for _, n := range c.Nodes {
			addr := hostPort(n.IPv6, sp.NodePort)
			a := askTCP(c.Client, addr)
			if sp.Protocol == corev1.ProtocolUDP {
				a = askUDP(c.Client, addr)
			}
			what := fmt.Sprintf("client to %s/%s", addr, sp.Protocol)
			for name, r := range reaches(t, what, a, backends...) {
				if want := svcMasqueradedSource(n, svcPod(t, c, name), true); r.Source != want {
					t.Errorf("%s: %s saw the request come from %s, want %s (masqueraded, not the client's %s)",
						what, name, r.Source, want, cluster.ClientIPv6)
				}
			}
		}
	}

	single := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "single6"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicySingleStack),
			IPFamilies:     []corev1.IPFamily{corev1.IPv6Protocol},
			Ports:          []corev1.ServicePort{tcpPort("tcp", 443, intstr.FromInt32(cluster.EchoPort))},
		},
	})
	if len(single.Spec.ClusterIPs) != 1 || !netip.MustParseAddr(single.Spec.ClusterIP).Is6() {
		t.Fatalf("IPv6 single-stack Service got ClusterIPs %v, want one IPv6 address", single.Spec.ClusterIPs)
	}
	backends6 := []*cluster.Pod{c.Nodes[0].Pods[0], c.Nodes[1].Pods[0]}
	setEndpoints(t, c, single, cluster.ReadyPods(backends6...))
	vip := hostPort(single.Spec.ClusterIP, 443)
	pod := c.Nodes[2].Pods[1]
	for name, r := range reaches(t, "pod to IPv6-only "+vip, askTCP(pod.NS, vip), backends6...) {
		if r.Source != pod.IPv6 {
			t.Errorf("IPv6-only: %s saw the request come from %s, want the pod's own %s", name, r.Source, pod.IPv6)
		}
	}
	n := c.Nodes[2]
	for name, r := range reaches(t, n.Name+" to IPv6-only "+vip, askTCP(n.NS, vip), backends6...) {
		if want := svcMasqueradedSource(n, svcPod(t, c, name), true); r.Source != want {
			t.Errorf("%s to IPv6-only: %s saw the request come from %s, want %s", n.Name, name, r.Source, want)
		}
	}
}

// svcPod is the pod named name.
func svcPod(t *testing.T, c *cluster.Cluster, name string) *cluster.Pod {
	t.Helper()
	for _, p := range c.Pods() {
		if p.Name == name {
			return p
		}
	}
	t.Fatalf("no pod %s", name)
	return nil
}

// svcBridgeIP is node n's address on its pod bridge (its pods' gateway),
// of the family.
func svcBridgeIP(n *cluster.Node, v6 bool) netip.Addr {
	p := n.PodCIDRs[0]
	if v6 {
		p = n.PodCIDRs[1]
	}
	return p.Masked().Addr().Next()
}

// svcMasqueradedSource is the source an endpoint sees for traffic that
// node via masqueraded: the address of via's interface towards it, its
// pod bridge for its own pods, its fabric address for other nodes' pods.
func svcMasqueradedSource(via *cluster.Node, backend *cluster.Pod, v6 bool) netip.Addr {
	if backend.Node == via {
		return svcBridgeIP(via, v6)
	}
	if v6 {
		return via.IPv6
	}
	return via.IPv4
}

// svcCheckDNAT opens one flow from pod to addr over proto ("tcp", "udp")
// and checks, in the conntrack table of the pod's node (where the Service
// is DNATed), that it went to the pod that answered, on wantPort.
func svcCheckDNAT(t *testing.T, c *cluster.Cluster, pod *cluster.Pod, proto, addr string, wantPort uint16) {
	t.Helper()
	var local netip.AddrPort
	var r netnstest.Reply
	switch proto {
	case "tcp":
		conn, reply, err := pod.DialTCP(addr, answer)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		local, r = conn.LocalAddr(), reply
	case "udp":
		conn, err := pod.DialUDP(addr, answer)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = conn.Close() }()
		if r, err = conn.Ask(); err != nil {
			t.Fatal(err)
		}
		local = conn.LocalAddr()
	}
	svcCheckConntrack(t, c, pod, proto, local, addr, r.Server, wantPort)
}

// svcCheckHTTPDNAT is svcCheckDNAT for an HTTP request on a connection of
// our own (GetHTTP hides its local address).
func svcCheckHTTPDNAT(t *testing.T, c *cluster.Cluster, pod *cluster.Pod, addr string, wantPort uint16) {
	t.Helper()
	var conn net.Conn
	err := pod.Do(func() (err error) {
		conn, err = net.DialTimeout("tcp", addr, answer)
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	local := conn.LocalAddr().(*net.TCPAddr).AddrPort()
	server, err := svcHTTPExchange(conn, addr)
	if err != nil {
		t.Fatal(err)
	}
	svcCheckConntrack(t, c, pod, "tcp", local, addr, server, wantPort)
}

// svcCheckConntrack finds the flow from local in the conntrack table of
// pod's node and checks its reply tuple: from server's address, port
// wantPort.
func svcCheckConntrack(t *testing.T, c *cluster.Cluster, pod *cluster.Pod, proto string, local netip.AddrPort, addr, server string, wantPort uint16) {
	t.Helper()
	backend := svcPod(t, c, server)
	family, wantAddr := "ipv4", backend.IPv4
	if local.Addr().Is6() {
		family, wantAddr = "ipv6", backend.IPv6
	}
	// Matched on both ends: the kernel reuses source ports, so an earlier
	// flow from the same port to another Service may still be listed.
	frontend, err := netip.ParseAddrPort(addr)
	if err != nil {
		t.Fatalf("frontend %q: %v", addr, err)
	}
	out, err := pod.Node.NS.Run("conntrack", "-L", "-f", family, "-p", proto,
		"--orig-src", local.Addr().String(), "--sport", strconv.Itoa(int(local.Port())),
		"--orig-dst", frontend.Addr().String(), "--dport", strconv.Itoa(int(frontend.Port())))
	if err != nil {
		t.Fatalf("conntrack on %s: %v: %s", pod.Node.Name, err, out)
	}
	var flows []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, proto) {
			flows = append(flows, line)
		}
	}
	if len(flows) != 1 {
		t.Fatalf("conntrack on %s: %d flows from %s to %s, want 1:\n%s", pod.Node.Name, len(flows), local, addr, out)
	}
	// orig src= dst= sport= dport= … reply src= dst= sport= dport=
	fields := map[string][]string{}
	for _, f := range strings.Fields(flows[0]) {
		if k, v, ok := strings.Cut(f, "="); ok {
			fields[k] = append(fields[k], v)
		}
	}
	if len(fields["src"]) < 2 || len(fields["sport"]) < 2 {
		t.Fatalf("conntrack on %s: cannot parse %q", pod.Node.Name, flows[0])
	}
	if got, want := fields["src"][1], wantAddr.String(); got != want {
		t.Errorf("flow %s to %s answered by %s was DNATed to %s, want %s: %s", local, addr, server, got, want, flows[0])
	}
	if got, want := fields["sport"][1], strconv.Itoa(int(wantPort)); got != want {
		t.Errorf("flow %s to %s was DNATed to port %s, want %s: %s", local, addr, got, want, flows[0])
	}
}

// svcHTTPExchange sends GET / on conn and returns the name of the pod
// that answered 200.
func svcHTTPExchange(conn net.Conn, addr string) (string, error) {
	_ = conn.SetDeadline(time.Now().Add(answer))
	if _, err := fmt.Fprintf(conn, "GET / HTTP/1.1\r\nHost: %s\r\nConnection: close\r\n\r\n", addr); err != nil {
		return "", err
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		return "", err
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		return "", err
	}
	if resp.StatusCode != http.StatusOK {
		return "", fmt.Errorf("GET http://%s/: status %d: %s", addr, resp.StatusCode, body)
	}
	server, _, _ := strings.Cut(strings.TrimSpace(string(body)), " ")
	return server, nil
}
