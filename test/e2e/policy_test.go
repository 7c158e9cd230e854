package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

// The scenarios of this file follow the traffic-policy, session-affinity,
// load-balancer and terminating-endpoint tests of the sig-network Service
// e2e suite (test/e2e/network/service.go and loadbalancer.go upstream).

// Addresses the load balancer "delivers" to node0 (the clients route
// cluster.ExternalRanges there).
var (
	policyLBIPv4 = netip.MustParseAddr("203.0.113.20")
	policyLBIPv6 = netip.MustParseAddr("fd00:203::20")
)

// TestExternalTrafficPolicyLocal: a LoadBalancer Service (so a NodePort
// Service too) with externalTrafficPolicy Local and its endpoints on node0
// only. From the client outside the cluster, node0's NodePort and the
// LoadBalancer IP (delivered to node0) are answered only by node0's pods,
// which see the client's own address (no SNAT), on both families; node1's
// and node2's NodePorts, which have no local endpoint, drop the request
// (a timeout, not a reject, and not a remote pod). Pods reaching the
// ClusterIP, and a pod or the node itself reaching node1's NodePort or
// the LB IP, still reach every endpoint: the policy binds external
// traffic only. With the endpoints moved to node1, the LB IP delivered to
// node0 is dropped and node1's NodePort answers from node1's pods.
func TestExternalTrafficPolicyLocal(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "local"},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeLoadBalancer,
			IPFamilyPolicy:        ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			Ports:                 []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromString("echo"))},
		},
	})
	policySetIngress(t, c, svc, policyLBIPv4, policyLBIPv6)
	setEndpoints(t, c, svc, cluster.ReadyPods(n0.Pods...))
	nodePort := svc.Spec.Ports[0].NodePort

	for _, family := range []corev1.IPFamily{corev1.IPv4Protocol, corev1.IPv6Protocol} {
		v6 := family == corev1.IPv6Protocol
		src, lb := cluster.ClientIPv4, policyLBIPv4
		if v6 {
			src, lb = cluster.ClientIPv6, policyLBIPv6
		}
		for what, target := range map[string]string{
			"NodePort of node0": hostPort(policyNodeIP(n0, v6), nodePort),
			"LoadBalancer IP":   hostPort(lb, 80),
		} {
			what = fmt.Sprintf("client to the %s (%s)", what, family)
			seen := reaches(t, what, askTCP(c.Client, target), n0.Pods...)
			onlyReaches(t, what, askTCP(c.Client, target), 20, n0.Pods...)
			policySources(t, what, seen, src)
		}
	}
	policyAllDropped(t, map[string]ask{
		"client to node1's NodePort (IPv4)": askTCP(c.Client, hostPort(n1.IPv4, nodePort)),
		"client to node2's NodePort (IPv4)": askTCP(c.Client, hostPort(n2.IPv4, nodePort)),
		"client to node1's NodePort (IPv6)": askTCP(c.Client, hostPort(n1.IPv6, nodePort)),
	})

	// Inside the cluster the policy does not apply.
	pod := n1.Pods[0]
	seen := reaches(t, "pod on node1 to the ClusterIP", askTCP(pod.NS, hostPort(clusterIP(t, svc, corev1.IPv4Protocol), 80)), n0.Pods...)
	policySources(t, "pod on node1 to the ClusterIP", seen, pod.IPv4)
	reaches(t, "pod on node2 to the IPv6 ClusterIP", askTCP(n2.Pods[0].NS, hostPort(clusterIP(t, svc, corev1.IPv6Protocol), 80)), n0.Pods...)
	reaches(t, "pod on node1 to node1's NodePort", askTCP(pod.NS, hostPort(n1.IPv4, nodePort)), n0.Pods...)
	reaches(t, "pod on node1 to the LB IP", askTCP(pod.NS, hostPort(policyLBIPv4, 80)), n0.Pods...)
	reaches(t, "node1 to its own NodePort", askTCP(n1.NS, hostPort(n1.IPv4, nodePort)), n0.Pods...)

	// The endpoints move to node1: node0 has none left.
	setEndpoints(t, c, svc, cluster.ReadyPods(n1.Pods...))
	seen = reaches(t, "client to node1's NodePort, endpoints moved there", askTCP(c.Client, hostPort(n1.IPv4, nodePort)), n1.Pods...)
	policySources(t, "client to node1's NodePort", seen, cluster.ClientIPv4)
	policyAllDropped(t, map[string]ask{
		"client to the LB IP on node0, no local endpoint": askTCP(c.Client, hostPort(policyLBIPv4, 80)),
		"client to node0's NodePort, no local endpoint":   askTCP(c.Client, hostPort(n0.IPv4, nodePort)),
	})
}

// TestInternalTrafficPolicyLocal: a ClusterIP Service with
// internalTrafficPolicy Local and two endpoints on each of node0 and
// node1. A pod on node0 reaches only node0's endpoints (both of them), a
// pod on node1 only node1's, over TCP and UDP, and so does a node itself;
// a pod on node2, with no local endpoint, gets no answer: the contract
// says "none local means drop", so a timeout, not a reject. When node2
// gets an endpoint, its pod reaches that one only.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "local"},
		Spec: corev1.ServiceSpec{
			InternalTrafficPolicy: ptr.To(corev1.ServiceInternalTrafficPolicyLocal),
			Ports: []corev1.ServicePort{
				tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort)),
				udpPort("udp", 53, intstr.FromString("dns")),
			},
		},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(append(slices.Clone(n0.Pods), n1.Pods...)...))
	tcp, udp := hostPort(svc.Spec.ClusterIP, 80), hostPort(svc.Spec.ClusterIP, 53)

	for _, n := range []*cluster.Node{n0, n1} {
		// Pod 1 reaches pod 0 and, by hairpin, itself.
		client := n.Pods[1]
		what := fmt.Sprintf("pod on %s to the ClusterIP", n.Name)
		seen := reaches(t, what+" (TCP)", askTCP(client.NS, tcp), n.Pods...)
		onlyReaches(t, what+" (TCP)", askTCP(client.NS, tcp), 20, n.Pods...)
		if r := seen[n.Pods[0].Name]; r.Source != client.IPv4 {
			t.Errorf("%s: %s saw %s, want the pod's own %s", what, n.Pods[0].Name, r.Source, client.IPv4)
		}
		reaches(t, what+" (UDP)", askUDP(client.NS, udp), n.Pods...)
		onlyReaches(t, what+" (UDP)", askUDP(client.NS, udp), 20, n.Pods...)
		reaches(t, n.Name+" itself to the ClusterIP", askTCP(n.NS, tcp), n.Pods...)
	}
	// node2 has the Service (createService waited for every node), so
	// the drop is the policy's, not the gateway's.
	policyAllDropped(t, map[string]ask{
		"pod on node2 to the ClusterIP (TCP), no local endpoint": askTCP(n2.Pods[0].NS, tcp),
		"pod on node2 to the ClusterIP (UDP), no local endpoint": askUDP(n2.Pods[0].NS, udp),
		"node2 to the ClusterIP (TCP), no local endpoint":        askTCP(n2.NS, tcp),
	})

	setEndpoints(t, c, svc, cluster.ReadyPods(n0.Pods[0], n1.Pods[0], n2.Pods[1]))
	reaches(t, "pod on node2 to the ClusterIP, a local endpoint added", askTCP(n2.Pods[0].NS, tcp), n2.Pods[1])
	onlyReaches(t, "pod on node2 to the ClusterIP", askTCP(n2.Pods[0].NS, tcp), 20, n2.Pods[1])
	reaches(t, "pod on node0 to the ClusterIP, one local endpoint left", askTCP(n0.Pods[1].NS, tcp), n0.Pods[0])
	onlyReaches(t, "pod on node0 to the ClusterIP, one local endpoint left", askTCP(n0.Pods[1].NS, tcp), 20, n0.Pods[0])
}

// TestSessionAffinityClientIP: with sessionAffinity ClientIP one client
// gets the same endpoint for 20 new connections in a row, from a pod
// through the ClusterIP and from outside through a NodePort, while the
// same endpoints behind a Service without affinity answer from all four
// pods; a second client gets its own (sticky) choice.
func TestSessionAffinityClientIP(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := policyBackends(c)
	sticky := createService(t, c, ns, policyAffinityService("sticky", corev1.ServiceTypeNodePort, 10800))
	plain := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "plain"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, sticky, cluster.ReadyPods(backends...))
	setEndpoints(t, c, plain, cluster.ReadyPods(backends...))

	client := c.Nodes[2].Pods[0]
	reaches(t, "pod to the Service without affinity", askTCP(client.NS, hostPort(plain.Spec.ClusterIP, 80)), backends...)
	vip := hostPort(sticky.Spec.ClusterIP, 80)
	policySticky(t, "pod to the ClusterIP with affinity", askTCP(client.NS, vip), backends)
	policySticky(t, "another pod to the ClusterIP with affinity", askTCP(c.Nodes[2].Pods[1].NS, vip), backends)
	nodePort := hostPort(c.Nodes[0].IPv4, sticky.Spec.Ports[0].NodePort)
	policySticky(t, "client to the NodePort with affinity", askTCP(c.Client, nodePort), backends)
}

// TestSessionAffinityTimeout: with sessionAffinity ClientIP and
// timeoutSeconds 2 a client is sticky while it keeps connecting, but once
// it stays idle past the timeout its affinity entry is gone from node's
// affinity map and its next connection is drawn anew: over rounds that
// each wait out the timeout, it lands on another endpoint (4 endpoints:
// a round keeps the old one with probability 1/4, so ten rounds all
// alike is one chance in a million).
func TestSessionAffinityTimeout(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := policyBackends(c)
	const timeout = 2
	svc := createService(t, c, ns, policyAffinityService("sticky", corev1.ServiceTypeClusterIP, timeout))
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	client := c.Nodes[2].Pods[0]
	vip := hostPort(svc.Spec.ClusterIP, 80)

	first := policySticky(t, "pod to the ClusterIP with affinity", askTCP(client.NS, vip), backends)
	var firstIP string
	for _, p := range backends {
		if p.Name == first {
			firstIP = p.IPv4.String()
		}
	}
	if got := policyAffinityEntries(t, c.Nodes[2], client.IPv4, svc.Spec.ClusterIP); !slices.Equal(got, []string{firstIP}) {
		t.Fatalf("node2's affinity entries for %s to %s lead to %v, want the one to %s (%s)", client.IPv4, vip, got, first, firstIP)
	}
	moved := false
	for range 10 {
		time.Sleep(timeout*time.Second + 700*time.Millisecond)
		if got := policyAffinityEntries(t, c.Nodes[2], client.IPv4, svc.Spec.ClusterIP); len(got) != 0 {
			t.Fatalf("node2 still holds affinity entries for %s (to %v) after %ds idle", client.IPv4, got, timeout)
		}
		if got := policySticky(t, "pod to the ClusterIP, after the timeout", askTCP(client.NS, vip), backends); got != first {
			moved = true
			break
		}
	}
	if !moved {
		t.Errorf("the pod reached %s in every round: its affinity never expired", first)
	}
}

// TestSessionAffinityLive: session affinity switched on and off on a live
// Service (updateService) takes effect without a restart: off, a client
// spreads over all the endpoints; on, it sticks to one; off again, it
// spreads again.
func TestSessionAffinityLive(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := policyBackends(c)
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "toggled"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	client := c.Nodes[2].Pods[0]
	a := askTCP(client.NS, hostPort(svc.Spec.ClusterIP, 80))

	reaches(t, "affinity off", a, backends...)
	updateService(t, c, svc, func(s *corev1.Service) {
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To[int32](600)}}
	})
	policySticky(t, "affinity switched on", a, backends)
	updateService(t, c, svc, func(s *corev1.Service) {
		s.Spec.SessionAffinity = corev1.ServiceAffinityNone
		s.Spec.SessionAffinityConfig = nil
	})
	reaches(t, "affinity switched off again", a, backends...)
}

// TestLoadBalancerSourceRanges: a LoadBalancer Service with ingress IPs
// 203.0.113.20 and fd00:203::20 (written into its status, as a cloud
// controller would) and loadBalancerSourceRanges admitting only the
// client: the client is answered on the LB IPs; the stranger, outside
// the ranges, is dropped there (a timeout) but still answered on the
// NodePort, which the ranges do not guard. Removing the ranges live lets
// the stranger in on the LB IPs.
func TestLoadBalancerSourceRanges(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := policyBackends(c)
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "guarded"},
		Spec: corev1.ServiceSpec{
			Type:                     corev1.ServiceTypeLoadBalancer,
			IPFamilyPolicy:           ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			LoadBalancerSourceRanges: []string{cluster.ClientIPv4.String() + "/32", cluster.ClientIPv6.String() + "/128"},
			Ports:                    []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))},
		},
	})
	policySetIngress(t, c, svc, policyLBIPv4, policyLBIPv6)
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	lb4, lb6 := hostPort(policyLBIPv4, 80), hostPort(policyLBIPv6, 80)

	reaches(t, "client to the LB IP (IPv4)", askTCP(c.Client, lb4), backends...)
	reaches(t, "client to the LB IP (IPv6)", askTCP(c.Client, lb6), backends...)
	policyAllDropped(t, map[string]ask{
		"stranger to the LB IP (IPv4)": askTCP(c.Stranger, lb4),
		"stranger to the LB IP (IPv6)": askTCP(c.Stranger, lb6),
	})
	reaches(t, "stranger to the NodePort", askTCP(c.Stranger, hostPort(c.Nodes[0].IPv4, svc.Spec.Ports[0].NodePort)), backends...)

	updateService(t, c, svc, func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = nil })
	reaches(t, "stranger to the LB IP, ranges removed (IPv4)", askTCP(c.Stranger, lb4), backends...)
	reaches(t, "stranger to the LB IP, ranges removed (IPv6)", askTCP(c.Stranger, lb6), backends...)
	reaches(t, "client to the LB IP, ranges removed", askTCP(c.Client, lb4), backends...)
}

// TestHealthCheckNodePort: a LoadBalancer Service with
// externalTrafficPolicy Local gets a healthCheckNodePort, which every node
// serves: 200 on a node with local ready endpoints, 503 on one without,
// with a JSON body naming the Service and the count of local endpoints.
// The answers follow the endpoints as they move between nodes, go away
// altogether, and come back; a node whose local endpoints are all
// terminating answers 503 (KEP-1669: the load balancer must drain the
// node, though the node still serves the terminating pods); deleting the
// Service closes the port.
func TestHealthCheckNodePort(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	n0, n1, n2 := c.Nodes[0], c.Nodes[1], c.Nodes[2]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "checked"},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeLoadBalancer,
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
			Ports:                 []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))},
		},
	})
	hc := svc.Spec.HealthCheckNodePort
	if hc == 0 {
		t.Fatalf("Service %s: no healthCheckNodePort allocated", svc.Name)
	}
	// want is, per node, the local endpoint count the check reports.
	expect := func(step string, want map[*cluster.Node]int) {
		t.Helper()
		for _, n := range c.Nodes {
			policyHealthCheck(t, c, step, n, hc, svc, want[n])
		}
	}

	setEndpoints(t, c, svc, cluster.ReadyPods(n0.Pods...))
	expect("endpoints on node0", map[*cluster.Node]int{n0: 2})
	setEndpoints(t, c, svc, cluster.ReadyPods(n1.Pods[0], n2.Pods[0], n2.Pods[1]))
	expect("endpoints moved to node1 and node2", map[*cluster.Node]int{n1: 1, n2: 2})
	setEndpoints(t, c, svc, nil)
	expect("no endpoints", nil)
	// Each step changes the count of some node, so that a check cannot
	// pass on the previous step's answer.
	setEndpoints(t, c, svc, []cluster.Endpoint{
		{Pod: n0.Pods[0], State: cluster.Ready},
		{Pod: n0.Pods[1], State: cluster.Unready},
	})
	expect("a ready and an unready endpoint on node0", map[*cluster.Node]int{n0: 1})
	setEndpoints(t, c, svc, cluster.ReadyPods(n1.Pods[0], n2.Pods[0], n2.Pods[1]))
	expect("endpoints back on node1 and node2", map[*cluster.Node]int{n1: 1, n2: 2})
	setEndpoints(t, c, svc, []cluster.Endpoint{
		{Pod: n1.Pods[0], State: cluster.Ready},
		{Pod: n2.Pods[0], State: cluster.Terminating},
		{Pod: n2.Pods[1], State: cluster.Terminating},
	})
	expect("node2's endpoints terminating", map[*cluster.Node]int{n1: 1})
	// Meanwhile node2 still serves its terminating pods (see
	// TestTerminatingEndpointsFallback).
	reaches(t, "client to node2's NodePort, local endpoints terminating",
		askTCP(c.Client, hostPort(n2.IPv4, svc.Spec.Ports[0].NodePort)), n2.Pods...)

	if err := c.API.Delete(context.Background(), svc); err != nil {
		t.Fatal(err)
	}
	eventually(t, "the health check port closed with its Service", func() error {
		status, body, err := c.Client.GetHTTP(fmt.Sprintf("http://%s/", hostPort(n1.IPv4, hc)), answer)
		if err == nil {
			return fmt.Errorf("node1 still answers %d %s", status, strings.TrimSpace(body))
		}
		if !isRefused(err) {
			return fmt.Errorf("not refused: %w", err)
		}
		return nil
	})
}

// TestTerminatingEndpointsFallback: during a rollout, a Service whose
// endpoints are all Terminating (serving, not ready) is still answered by
// them, and a TerminatingUnready endpoint (not serving) never is; once a
// Ready endpoint appears only it answers; with nothing but
// TerminatingUnready endpoints new connections are refused (no usable
// endpoint). The contract's fallback is "if none is ready", for every
// policy: with externalTrafficPolicy Local it is decided per node among
// the local endpoints alone, so node0, whose local pods are all
// terminating, is answered by them while node1 answers from its ready pod,
// and node0 with only a TerminatingUnready pod drops (none local), while
// the Service still has a usable endpoint elsewhere.
func TestTerminatingEndpointsFallback(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	n0, n1 := c.Nodes[0], c.Nodes[1]

	t.Run("cluster traffic", func(t *testing.T) {
		svc := createService(t, c, ns, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "rollout"},
			Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
		})
		client := c.Nodes[2].Pods[0]
		a := askTCP(client.NS, hostPort(svc.Spec.ClusterIP, 80))

		setEndpoints(t, c, svc, []cluster.Endpoint{
			{Pod: n0.Pods[0], State: cluster.Terminating},
			{Pod: n1.Pods[0], State: cluster.Terminating},
			{Pod: n1.Pods[1], State: cluster.TerminatingUnready},
		})
		reaches(t, "all endpoints terminating", a, n0.Pods[0], n1.Pods[0])
		onlyReaches(t, "all endpoints terminating", a, 20, n0.Pods[0], n1.Pods[0])
		setEndpoints(t, c, svc, []cluster.Endpoint{
			{Pod: n0.Pods[0], State: cluster.Terminating},
			{Pod: n1.Pods[0], State: cluster.Terminating},
			{Pod: n1.Pods[1], State: cluster.TerminatingUnready},
			{Pod: n0.Pods[1], State: cluster.Ready},
		})
		reaches(t, "a new ready endpoint", a, n0.Pods[1])
		onlyReaches(t, "a new ready endpoint", a, 20, n0.Pods[1])
		setEndpoints(t, c, svc, []cluster.Endpoint{
			{Pod: n0.Pods[0], State: cluster.TerminatingUnready},
			{Pod: n1.Pods[1], State: cluster.TerminatingUnready},
			{Pod: n0.Pods[1], State: cluster.Unready},
		})
		refused(t, "only terminating unready (and unready) endpoints", a)
	})

	t.Run("externalTrafficPolicy Local", func(t *testing.T) {
		svc := createService(t, c, ns, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "rollout-local"},
			Spec: corev1.ServiceSpec{
				Type:                  corev1.ServiceTypeNodePort,
				ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyLocal,
				Ports:                 []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))},
			},
		})
		nodePort := svc.Spec.Ports[0].NodePort
		via0, via1 := askTCP(c.Client, hostPort(n0.IPv4, nodePort)), askTCP(c.Client, hostPort(n1.IPv4, nodePort))

		setEndpoints(t, c, svc, []cluster.Endpoint{
			{Pod: n0.Pods[0], State: cluster.Terminating},
			{Pod: n0.Pods[1], State: cluster.TerminatingUnready},
			{Pod: n1.Pods[0], State: cluster.Ready},
		})
		seen := reaches(t, "node0, local endpoints terminating", via0, n0.Pods[0])
		policySources(t, "node0, local endpoints terminating", seen, cluster.ClientIPv4)
		onlyReaches(t, "node0, local endpoints terminating", via0, 20, n0.Pods[0])
		reaches(t, "node1, a ready local endpoint", via1, n1.Pods[0])
		// Cluster traffic ignores the terminating ones: there is a ready
		// endpoint.
		reaches(t, "pod to the ClusterIP", askTCP(c.Nodes[2].Pods[0].NS, hostPort(svc.Spec.ClusterIP, 80)), n1.Pods[0])

		setEndpoints(t, c, svc, []cluster.Endpoint{
			{Pod: n0.Pods[0], State: cluster.Terminating},
			{Pod: n0.Pods[1], State: cluster.Ready},
			{Pod: n1.Pods[0], State: cluster.Ready},
		})
		reaches(t, "node0, a new ready local endpoint", via0, n0.Pods[1])
		onlyReaches(t, "node0, a new ready local endpoint", via0, 20, n0.Pods[1])

		setEndpoints(t, c, svc, []cluster.Endpoint{
			{Pod: n0.Pods[1], State: cluster.TerminatingUnready},
			{Pod: n1.Pods[0], State: cluster.Ready},
		})
		dropped(t, "node0, only a terminating unready local endpoint", via0)
		reaches(t, "node1, still its ready endpoint", via1, n1.Pods[0])
	})
}

// policyBackends are two pods on node0 and two on node1.
func policyBackends(c *cluster.Cluster) []*cluster.Pod {
	return append(slices.Clone(c.Nodes[0].Pods), c.Nodes[1].Pods...)
}

// policyAffinityService is a Service of type typ with session affinity
// ClientIP and timeout seconds, on port 80 to the echo port.
func policyAffinityService(name string, typ corev1.ServiceType, timeout int32) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.ServiceSpec{
			Type:                  typ,
			SessionAffinity:       corev1.ServiceAffinityClientIP,
			SessionAffinityConfig: &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To(timeout)}},
			Ports:                 []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))},
		},
	}
}

// policySticky waits until 20 new connections in a row all reach the same
// one of backends, and returns its name.
func policySticky(t *testing.T, what string, a ask, backends []*cluster.Pod) string {
	t.Helper()
	var server string
	eventually(t, what, func() error {
		seen, err := sample(a, 20, backends)
		switch {
		case err != nil:
			return err
		case len(seen) != 1:
			return fmt.Errorf("20 connections reached %v, want a single endpoint", keys(seen))
		}
		server = keys(seen)[0]
		return nil
	})
	return server
}

// policyAffinityEntries lists the endpoint addresses node's affinity
// maps hold for client to the frontend address (any port), from `nft
// list table`.
func policyAffinityEntries(t *testing.T, n *cluster.Node, client netip.Addr, frontend string) []string {
	t.Helper()
	out, err := n.NS.Run("nft", "list", "table", "inet", "nftproxy")
	if err != nil {
		t.Fatalf("%s: nft list table: %v\n%s", n.Name, err, out)
	}
	// Elements print as "client . frontend . tcp . 80 timeout 2s expires
	// 1s996ms : endpoint . 8080", comma-separated, several to a line.
	entry := regexp.MustCompile(regexp.QuoteMeta(client.String()+" . "+frontend+" . ") + `[^:,{}]*: ([0-9a-f:.]+) \. `)
	var endpoints []string
	inAffinity := false
	for _, line := range strings.Split(out, "\n") {
		trimmed := strings.TrimSpace(line)
		switch {
		case strings.HasPrefix(trimmed, "map affinity"):
			inAffinity = true
		case strings.HasPrefix(trimmed, "map ") || strings.HasPrefix(trimmed, "set ") || strings.HasPrefix(trimmed, "chain "):
			inAffinity = false
		}
		if inAffinity {
			for _, m := range entry.FindAllStringSubmatch(line, -1) {
				endpoints = append(endpoints, m[1])
			}
		}
	}
	return endpoints
}

// policySetIngress writes the load balancer's ingress IPs into svc's
// status, as a cloud controller would.
func policySetIngress(t *testing.T, c *cluster.Cluster, svc *corev1.Service, ips ...netip.Addr) {
	t.Helper()
	ctx := context.Background()
	var cur corev1.Service
	if err := c.API.Get(ctx, client.ObjectKeyFromObject(svc), &cur); err != nil {
		t.Fatal(err)
	}
	cur.Status.LoadBalancer.Ingress = nil
	for _, ip := range ips {
		cur.Status.LoadBalancer.Ingress = append(cur.Status.LoadBalancer.Ingress, corev1.LoadBalancerIngress{IP: ip.String()})
	}
	if err := c.API.Status().Update(ctx, &cur); err != nil {
		t.Fatalf("writing the load balancer status of %s: %v", svc.Name, err)
	}
}

// policyNodeIP is the node's address of the family.
func policyNodeIP(n *cluster.Node, v6 bool) netip.Addr {
	if v6 {
		return n.IPv6
	}
	return n.IPv4
}

// policySources checks that every backend saw the request come from want.
func policySources(t *testing.T, what string, seen map[string]netnstest.Reply, want netip.Addr) {
	t.Helper()
	for name, r := range seen {
		if r.Source != want {
			t.Errorf("%s: %s saw the request come from %s, want %s", what, name, r.Source, want)
		}
	}
}

// policyAllDropped is dropped for several requests at once, so their
// timeouts run side by side.
func policyAllDropped(t *testing.T, asks map[string]ask) {
	t.Helper()
	var (
		mu   sync.Mutex
		errs []string
		wg   sync.WaitGroup
	)
	for what, a := range asks {
		wg.Go(func() {
			deadline := time.Now().Add(converge)
			for {
				r, err := a()
				switch {
				case errors.Is(err, os.ErrDeadlineExceeded):
					return
				case time.Now().After(deadline):
					mu.Lock()
					if err == nil {
						errs = append(errs, fmt.Sprintf("%s: still answered by %s after %v", what, r, converge))
					} else {
						errs = append(errs, fmt.Sprintf("%s: failed, but not by a timeout: %v", what, err))
					}
					mu.Unlock()
					return
				}
				time.Sleep(50 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	slices.Sort(errs)
	for _, e := range errs {
		t.Error(e)
	}
	if len(errs) > 0 {
		t.FailNow()
	}
}

// policyHealthCheckReply is the health check's JSON body.
type policyHealthCheckReply struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints int `json:"localEndpoints"`
}

// policyHealthCheck waits until GET http://<node>:<port>/ from the client
// answers as it should with local endpoints on the node: 200 with some,
// 503 with none, and the body naming svc and the count.
func policyHealthCheck(t *testing.T, c *cluster.Cluster, step string, n *cluster.Node, port int32, svc *corev1.Service, local int) {
	t.Helper()
	url := fmt.Sprintf("http://%s/", hostPort(n.IPv4, port))
	wantStatus := http.StatusServiceUnavailable
	if local > 0 {
		wantStatus = http.StatusOK
	}
	eventually(t, fmt.Sprintf("%s: health check of %s", step, n.Name), func() error {
		status, body, err := c.Client.GetHTTP(url, answer)
		if err != nil {
			return err
		}
		var r policyHealthCheckReply
		if err := json.Unmarshal([]byte(body), &r); err != nil {
			return fmt.Errorf("status %d, body %q: %w", status, body, err)
		}
		if status != wantStatus || r.LocalEndpoints != local || r.Service.Namespace != svc.Namespace || r.Service.Name != svc.Name {
			return fmt.Errorf("got %d %s, want %d with %d local endpoints of %s/%s",
				status, strings.TrimSpace(body), wantStatus, local, svc.Namespace, svc.Name)
		}
		return nil
	})
}
