package netnstest

import (
	"fmt"
	"net/netip"
	"testing"
)

// Bridge is the pods' bridge in the node namespace.
const Bridge = "br0"

// Topology is a node, the namespace running the proxy under test, with a
// client outside the cluster on one side (192.168.0.0/24, fd00:1::/64)
// and pods on a bridge on the other (10.1.0.0/24, fd00:10::/64). The
// node's default routes lead to a sink that drops whatever reaches it, so
// a packet the proxy fails to catch leaves the node and is lost, as off a
// real node, instead of being refused with "no route" (which would look
// like a proxy's reject).
type Topology struct {
	Node, Client, Sink *NS
	Pods               []*Pod

	NodeIPv4, NodeIPv6       netip.Addr // the node on the client link: 192.168.0.1, fd00:1::1
	ClientIPv4, ClientIPv6   netip.Addr // 192.168.0.2, fd00:1::2
	GatewayIPv4, GatewayIPv6 netip.Addr // the node on the bridge: 10.1.0.1, fd00:10::1

	NodeClientIface string // the node's end of the client link
	NodeSinkIface   string // the node's end of the sink link

	// BridgeNetfilter is whether bridged traffic (pod to pod on the
	// bridge) passes the node's IPv4/IPv6 netfilter hooks: true when the
	// kernel has br_netfilter, which the topology then switches on as a
	// real node has it. Without it, a pod reaching another pod through a
	// DNATed address without masquerade gets the reply straight over the
	// bridge, un-NATed, and the connection fails.
	BridgeNetfilter bool
}

// Pod is a namespace behind the node's bridge. Its Name ("pod0") shadows
// the namespace's: use p.NS.Name for the namespace itself.
type Pod struct {
	*NS
	Name       string     // "pod<i>", the name its servers should answer with
	IPv4, IPv6 netip.Addr // pod i: 10.1.0.(11+i), fd00:10::(0x11+i)
	Iface      string     // the pod's interface
	NodeIface  string     // its peer in the node namespace, a port of Bridge
}

// NewTopology builds a topology with the given number of pods and waits
// until every address in it is usable. Everything is removed at cleanup.
func NewTopology(t testing.TB, pods int) *Topology {
	t.Helper()
	tp := &Topology{
		Node:        New(t, "node"),
		Client:      New(t, "client"),
		Sink:        New(t, "sink"),
		NodeIPv4:    netip.MustParseAddr("192.168.0.1"),
		NodeIPv6:    netip.MustParseAddr("fd00:1::1"),
		ClientIPv4:  netip.MustParseAddr("192.168.0.2"),
		ClientIPv6:  netip.MustParseAddr("fd00:1::2"),
		GatewayIPv4: netip.MustParseAddr("10.1.0.1"),
		GatewayIPv6: netip.MustParseAddr("fd00:10::1"),
	}
	// A router, and one whose ICMP errors (the proxy's rejects, among
	// others) are not rate limited: by default a burst of a few per
	// destination, then one a second, which turns a test's later expected
	// rejects into timeouts. (Unreachable routes have their own, fixed
	// limit: a burst of 5, then one a second.)
	tp.Node.sysctls(t,
		"net.ipv4.ip_forward", "1",
		"net.ipv6.conf.all.forwarding", "1",
		"net.ipv4.icmp_ratelimit", "0",
		"net.ipv6.icmp.ratelimit", "0")
	// The node's sysctls for br_netfilter exist only if the kernel has it;
	// loading modules is not ours to do.
	if _, err := tp.Node.Run("test", "-e", "/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil {
		tp.Node.sysctls(t, "net.bridge.bridge-nf-call-iptables", "1", "net.bridge.bridge-nf-call-ip6tables", "1")
		tp.BridgeNetfilter = true
	}

	_, tp.NodeClientIface = Link(t, tp.Client, []string{"192.168.0.2/24", "fd00:1::2/64"},
		tp.Node, []string{"192.168.0.1/24", "fd00:1::1/64"})
	tp.Client.defaultRoutes(t, tp.NodeIPv4, tp.NodeIPv6)

	// The sink neither forwards nor has a route back: what reaches it is
	// dropped without an ICMP error. Blackhole defaults make sure of it.
	tp.Sink.sysctls(t, "net.ipv4.ip_forward", "0", "net.ipv6.conf.all.forwarding", "0")
	_, tp.NodeSinkIface = Link(t, tp.Sink, []string{"192.168.255.2/30", "fd00:ff::2/64"},
		tp.Node, []string{"192.168.255.1/30", "fd00:ff::1/64"})
	tp.Sink.IP(t, "-4", "route", "add", "blackhole", "default")
	tp.Sink.IP(t, "-6", "route", "add", "blackhole", "default")
	tp.Node.defaultRoutes(t, netip.MustParseAddr("192.168.255.2"), netip.MustParseAddr("fd00:ff::2"))

	// Traffic between pods is switched by the bridge. A pod reaching
	// itself through a DNATed address is routed back by the node, which
	// needs nothing special on a plain bridge; but with br_netfilter the
	// DNAT happens on the bridge path and the frame is bridged back out
	// of the port it came in on, which takes hairpin mode on the pod's
	// port (AddPod sets it, as kubelet and the CNI bridge plugin do).
	tp.Node.IP(t, "link", "add", Bridge, "type", "bridge")
	tp.Node.setUp(t, Bridge, []string{"10.1.0.1/24", "fd00:10::1/64"})
	for range pods {
		tp.AddPod(t)
	}
	tp.Node.WaitReady(t)
	return tp
}

// AddPod adds the next pod, ready to use. Not safe for concurrent use.
func (tp *Topology) AddPod(t testing.TB) *Pod {
	t.Helper()
	i := len(tp.Pods)
	if 11+i > 254 {
		t.Fatalf("netnstest: at most 244 pods fit in 10.1.0.0/24")
	}
	p := &Pod{
		Name: fmt.Sprintf("pod%d", i),
		IPv4: netip.AddrFrom4([4]byte{10, 1, 0, byte(11 + i)}),
		IPv6: netip.AddrFrom16([16]byte{0: 0xfd, 3: 0x10, 14: byte((0x11 + i) >> 8), 15: byte(0x11 + i)}),
	}
	p.NS = New(t, p.Name)
	p.Iface, p.NodeIface = Link(t, p.NS, []string{p.IPv4.String() + "/24", p.IPv6.String() + "/64"}, tp.Node, nil)
	tp.Node.IP(t, "link", "set", p.NodeIface, "master", Bridge)
	tp.Node.IP(t, "link", "set", p.NodeIface, "type", "bridge_slave", "hairpin", "on")
	p.defaultRoutes(t, tp.GatewayIPv4, tp.GatewayIPv6)
	tp.Node.WaitReady(t)
	tp.Pods = append(tp.Pods, p)
	return p
}

// defaultRoutes points the namespace's IPv4 and IPv6 default routes at
// the given gateways.
func (ns *NS) defaultRoutes(t testing.TB, gw4, gw6 netip.Addr) {
	t.Helper()
	ns.IP(t, "-4", "route", "add", "default", "via", gw4.String())
	ns.IP(t, "-6", "route", "add", "default", "via", gw6.String())
}
