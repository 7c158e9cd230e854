package dataplane

import (
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// Test fixtures: small builders for Services and EndpointSlices, so each
// test states only what matters to it.

const (
	testNode  = "node-a"
	otherNode = "node-b"
)

func testConfig() proxyv1alpha1.ProxyConfigSpec {
	spec := proxyv1alpha1.ProxyConfigSpec{ClusterCIDRs: []proxyv1alpha1.CIDR{"10.1.0.0/16", "fd00:10::/64"}}
	spec.Default()
	return spec
}

func newSnapshot(states ...ServiceState) *Snapshot {
	snap := &Snapshot{
		NodeName:      testNode,
		NodeAddresses: []netip.Addr{netip.MustParseAddr("192.168.0.1"), netip.MustParseAddr("fd00:1::1"), netip.MustParseAddr("127.0.0.1")},
		Config:        testConfig(),
		Services:      map[types.NamespacedName]ServiceState{},
	}
	for _, st := range states {
		snap.Services[types.NamespacedName{Namespace: st.Service.Namespace, Name: st.Service.Name}] = st
	}
	return snap
}

type svcOption func(*corev1.Service)

// service builds a ClusterIP Service; ports are "name:port/PROTO" or
// "port/PROTO" or "port" (TCP), with targetPort equal to the name or port.
func service(ns, name string, clusterIPs []string, ports []string, opts ...svcOption) *corev1.Service {
	svc := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{
			Type:       corev1.ServiceTypeClusterIP,
			ClusterIP:  clusterIPs[0],
			ClusterIPs: clusterIPs,
		},
	}
	for _, p := range ports {
		sp := parsePort(p)
		svc.Spec.Ports = append(svc.Spec.Ports, corev1.ServicePort{
			Name: sp.name, Port: sp.port, Protocol: sp.proto, TargetPort: intstr.FromInt32(sp.port),
		})
	}
	for _, o := range opts {
		o(svc)
	}
	return svc
}

type portSpec struct {
	name  string
	port  int32
	proto corev1.Protocol
}

func parsePort(s string) portSpec {
	ps := portSpec{proto: corev1.ProtocolTCP}
	var rest string
	if n, _ := fmt.Sscanf(s, "%d/%s", &ps.port, &rest); n >= 1 {
		if rest != "" {
			ps.proto = corev1.Protocol(rest)
		}
		return ps
	}
	for i := range s {
		if s[i] == ':' {
			ps.name = s[:i]
			inner := parsePort(s[i+1:])
			ps.port, ps.proto = inner.port, inner.proto
			return ps
		}
	}
	panic("bad port spec " + s)
}

func withNodePorts(nodePorts ...int32) svcOption {
	return func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeNodePort
		for i := range nodePorts {
			s.Spec.Ports[i].NodePort = nodePorts[i]
		}
	}
}

func withExternalIPs(ips ...string) svcOption {
	return func(s *corev1.Service) { s.Spec.ExternalIPs = ips }
}

func withLoadBalancer(ingress ...corev1.LoadBalancerIngress) svcOption {
	return func(s *corev1.Service) {
		s.Spec.Type = corev1.ServiceTypeLoadBalancer
		s.Status.LoadBalancer.Ingress = ingress
	}
}

// withAffinity sets ClientIP session affinity with a timeout in seconds.
func withAffinity(timeout int32) svcOption {
	return func(s *corev1.Service) {
		s.Spec.SessionAffinity = corev1.ServiceAffinityClientIP
		s.Spec.SessionAffinityConfig = &corev1.SessionAffinityConfig{ClientIP: &corev1.ClientIPConfig{TimeoutSeconds: ptr.To(timeout)}}
	}
}

func withSourceRanges(cidrs ...string) svcOption {
	return func(s *corev1.Service) { s.Spec.LoadBalancerSourceRanges = cidrs }
}

func withExternalPolicyLocal() svcOption {
	return func(s *corev1.Service) { s.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal }
}

func withInternalPolicyLocal() svcOption {
	return func(s *corev1.Service) {
		s.Spec.InternalTrafficPolicy = ptr.To(corev1.ServiceInternalTrafficPolicyLocal)
	}
}

// remote moves the endpoints from index from on to another node.
func remote(eps []ep, from int) []ep {
	out := slices.Clone(eps)
	for i := from; i < len(out); i++ {
		out[i].node = otherNode
	}
	return out
}

func withLabel(k, v string) svcOption {
	return func(s *corev1.Service) {
		if s.Labels == nil {
			s.Labels = map[string]string{}
		}
		s.Labels[k] = v
	}
}

type ep struct {
	addr        string
	node        string
	ready       bool
	serving     bool
	terminating bool
	// zones are the zone hints, none when empty.
	zones []string
}

func ready(addr string) ep { return ep{addr: addr, node: testNode, ready: true, serving: true} }
func terminating(addr string) ep {
	return ep{addr: addr, node: testNode, serving: true, terminating: true}
}

// slice builds an EndpointSlice of svc; ports are "name:port/PROTO" as
// for service, giving the target port numbers.
func slice(svc *corev1.Service, name string, family discoveryv1.AddressType, ports []string, eps ...ep) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Namespace: svc.Namespace, Name: name, Labels: map[string]string{discoveryv1.LabelServiceName: svc.Name}},
		AddressType: family,
	}
	for _, p := range ports {
		ps := parsePort(p)
		sl.Ports = append(sl.Ports, discoveryv1.EndpointPort{Name: ptr.To(ps.name), Port: ptr.To(ps.port), Protocol: ptr.To(ps.proto)})
	}
	for _, e := range eps {
		endpoint := discoveryv1.Endpoint{
			Addresses: []string{e.addr},
			NodeName:  ptr.To(e.node),
			Conditions: discoveryv1.EndpointConditions{
				Ready: ptr.To(e.ready), Serving: ptr.To(e.serving), Terminating: ptr.To(e.terminating),
			},
		}
		if len(e.zones) > 0 {
			endpoint.Hints = &discoveryv1.EndpointHints{}
			for _, z := range e.zones {
				endpoint.Hints.ForZones = append(endpoint.Hints.ForZones, discoveryv1.ForZone{Name: z})
			}
		}
		sl.Endpoints = append(sl.Endpoints, endpoint)
	}
	return sl
}

func state(svc *corev1.Service, slices ...*discoveryv1.EndpointSlice) ServiceState {
	return ServiceState{Service: svc, Slices: slices}
}

// exampleSnapshot covers the core features in a few Services; the golden
// files show what it computes to.
func exampleSnapshot() *Snapshot {
	web := service("default", "web", []string{"10.96.0.10"}, []string{"http:80", "https:443"},
		withNodePorts(30080, 30443), withExternalIPs("203.0.113.10"))
	dns := service("kube-system", "kube-dns", []string{"10.96.0.53", "fd00:96::53"}, []string{"dns:53/UDP", "dns-tcp:53/TCP"})
	empty := service("default", "empty", []string{"10.96.0.99"}, []string{"80"}, withNodePorts(30099))
	lb := service("default", "lb", []string{"10.96.0.20"}, []string{"80"}, withLoadBalancer(
		corev1.LoadBalancerIngress{IP: "198.51.100.20"},
		corev1.LoadBalancerIngress{IP: "198.51.100.21", IPMode: ptr.To(corev1.LoadBalancerIPModeProxy)},
	))
	lb.Spec.Ports[0].NodePort = 30020
	headless := service("default", "headless", []string{"None"}, []string{"80"})
	return newSnapshot(
		state(web,
			slice(web, "web-1", discoveryv1.AddressTypeIPv4, []string{"http:8080", "https:8443"}, ready("10.1.0.11"), ready("10.1.0.12")),
			slice(web, "web-2", discoveryv1.AddressTypeIPv4, []string{"http:8080", "https:8443"}, ep{addr: "10.1.0.13", ready: false})),
		state(dns,
			slice(dns, "dns-v4", discoveryv1.AddressTypeIPv4, []string{"dns:5353/UDP", "dns-tcp:5353/TCP"}, ready("10.1.0.21")),
			slice(dns, "dns-v6", discoveryv1.AddressTypeIPv6, []string{"dns:5353/UDP", "dns-tcp:5353/TCP"}, ready("fd00:10::21"))),
		state(empty),
		state(lb, slice(lb, "lb-1", discoveryv1.AddressTypeIPv4, []string{"8080"}, terminating("10.1.0.31"))),
		state(headless),
	)
}
