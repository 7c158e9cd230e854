package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"time"

	"github.com/nftproxy/nftproxy/internal/netns"
	"github.com/nftproxy/nftproxy/internal/netnstest"
)

// The network, all of it in namespaces named "npxe2e<pid>-<role>":
//
//	client 192.168.10.2 ─┐                       ┌─ node0 192.168.10.10 ── cbr0 10.244.0.1 ── pods 10.244.0.10, .11, …
//	stranger 192.168.10.3 ┼── fabric (bridge br0) ┼─ node1 192.168.10.11 ── cbr0 10.244.1.1 ── pods 10.244.1.10, …
//	gateway 192.168.10.1 ─┘                       └─ node2 …
//
// and the same in IPv6: fd00:10::/64 on the fabric, fd00:244:0:<i>::/64
// behind node i. Nodes route each other's pod ranges; their default route
// (and the clients') is the gateway, which drops whatever reaches it, as
// the world beyond a real node would. The clients route the external and
// load-balancer ranges to node0, as a load balancer would deliver them.

// Addresses a test can rely on.
var (
	ClientIPv4   = netip.MustParseAddr("192.168.10.2")
	ClientIPv6   = netip.MustParseAddr("fd00:10::2")
	StrangerIPv4 = netip.MustParseAddr("192.168.10.3")
	StrangerIPv6 = netip.MustParseAddr("fd00:10::3")
	gatewayIPv4  = netip.MustParseAddr("192.168.10.1")
	gatewayIPv6  = netip.MustParseAddr("fd00:10::1")

	// ClusterCIDRs are the pods' ranges, as the ProxyConfig gives them.
	ClusterCIDRs = []netip.Prefix{netip.MustParsePrefix("10.244.0.0/16"), netip.MustParsePrefix("fd00:244::/48")}

	// ExternalRanges are routed from the clients to node0: externalIPs
	// and load-balancer ingress IPs come from them.
	ExternalRanges = []netip.Prefix{netip.MustParsePrefix("203.0.113.0/24"), netip.MustParsePrefix("fd00:203::/64")}
)

// Ports every pod serves, each answering "<pod name> <client address>".
const (
	EchoPort = 8080 // TCP and UDP; container port name "echo" (TCP), "echo-udp"
	DNSPort  = 5353 // TCP and UDP; "dns-tcp", "dns"
	HTTPPort = 80   // HTTP; "http"
)

// PodPorts are the pods' named container ports, by protocol, which a
// Service's named targetPort resolves against.
var PodPorts = map[string]map[string]int32{
	"TCP": {"echo": EchoPort, "dns-tcp": DNSPort, "http": HTTPPort},
	"UDP": {"echo-udp": EchoPort, "dns": DNSPort},
}

func nodeIPv4(i int) netip.Addr { return netip.AddrFrom4([4]byte{192, 168, 10, byte(10 + i)}) }
func nodeIPv6(i int) netip.Addr {
	return netip.AddrFrom16([16]byte{0: 0xfd, 3: 0x10, 15: byte(0x10 + i)})
}
func podCIDRv4(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 244, byte(i), 0}), 24)
}
func podCIDRv6(i int) netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom16([16]byte{0: 0xfd, 2: 0x02, 3: 0x44, 7: byte(i)}), 64)
}

// host is address n of prefix p (n small).
func host(p netip.Prefix, n int) netip.Addr {
	b := p.Addr().AsSlice()
	b[len(b)-1] += byte(n)
	a, _ := netip.AddrFromSlice(b)
	return a
}

// staleNames matches the namespaces of this package, capturing the
// creator's PID, so a run can remove what a killed run left behind.
var staleNames = regexp.MustCompile(`^npxe2e([0-9]+)-`)

// network creates and removes the namespaces, remembering them in order.
type network struct {
	prefix string
	spaces []*netnstest.NS
	index  int // next explicit ifindex, see link
}

func newNetwork() *network {
	netns.SweepStale(staleNames)
	return &network{prefix: fmt.Sprintf("npxe2e%d-", os.Getpid()), index: 10000}
}

// add creates namespace "<prefix><role>" with lo up and IPv6 duplicate
// address detection off, so addresses are usable at once.
func (n *network) add(role string) (*netnstest.NS, error) {
	ns := &netnstest.NS{Name: n.prefix + role}
	if err := run("ip", "netns", "add", ns.Name); err != nil {
		return nil, err
	}
	n.spaces = append(n.spaces, ns)
	if err := run("ip", "-n", ns.Name, "link", "set", "lo", "up"); err != nil {
		return nil, err
	}
	return ns, ns.SetSysctls("net.ipv6.conf.all.accept_dad", "0", "net.ipv6.conf.default.accept_dad", "0")
}

// link joins a and b with a veth pair named aIf in a and bIf in b, and
// brings both ends up. The ends get distinct ifindexes: in fresh
// namespaces both would be 2, and the kernel then applies the carrier
// change up to a second late.
func (n *network) link(a *netnstest.NS, aIf string, b *netnstest.NS, bIf string) error {
	n.index += 2
	if err := run("ip", "-n", a.Name, "link", "add", aIf, "index", fmt.Sprint(n.index), "type", "veth",
		"peer", "name", bIf, "index", fmt.Sprint(n.index+1), "netns", b.Name); err != nil {
		return err
	}
	if err := run("ip", "-n", a.Name, "link", "set", aIf, "up"); err != nil {
		return err
	}
	return run("ip", "-n", b.Name, "link", "set", bIf, "up")
}

// close deletes every namespace, newest first; deleting a namespace
// takes its links, rules and conntrack entries with it.
func (n *network) close() error {
	var errs []string
	for i := len(n.spaces) - 1; i >= 0; i-- {
		if err := run("ip", "netns", "del", n.spaces[i].Name); err != nil {
			errs = append(errs, err.Error())
		}
	}
	n.spaces = nil
	if len(errs) > 0 {
		return fmt.Errorf("removing namespaces: %s", strings.Join(errs, "; "))
	}
	return nil
}

// addrs adds addresses (IPv6 without duplicate address detection) to dev.
func addrs(ns *netnstest.NS, dev string, prefixes ...netip.Prefix) error {
	for _, p := range prefixes {
		args := []string{"ip", "-n", ns.Name, "addr", "add", p.String(), "dev", dev}
		if p.Addr().Is6() {
			args = append(args, "nodad")
		}
		if err := run(args...); err != nil {
			return err
		}
	}
	return nil
}

// route adds a route: dst is a prefix or "default".
func route(ns *netnstest.NS, dst string, via netip.Addr) error {
	family := "-4"
	if via.Is6() {
		family = "-6"
	}
	return run("ip", "-n", ns.Name, family, "route", "add", dst, "via", via.String())
}

// run runs a command, bounded in time; the error carries its output.
func run(argv ...string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay = time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, out)
	}
	return nil
}
