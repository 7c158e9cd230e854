package netnstest_test

import (
	"encoding/json"
	"errors"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

const (
	timeout = 2 * time.Second
	// lost is how long to wait for an answer that must not come.
	lost = 300 * time.Millisecond
)

// ask asks addr over proto ("tcp" or "udp") from ns.
func ask(ns *netnstest.NS, proto string, addr netip.AddrPort, d time.Duration) (netnstest.Reply, error) {
	if proto == "udp" {
		return ns.AskUDP(addr.String(), d)
	}
	return ns.AskTCP(addr.String(), d)
}

// wantReply checks that from gets want from addr over TCP and UDP.
func wantReply(t *testing.T, from *netnstest.NS, addr netip.AddrPort, want netnstest.Reply) {
	t.Helper()
	for _, proto := range []string{"tcp", "udp"} {
		got, err := ask(from, proto, addr, timeout)
		if err != nil || got != want {
			t.Errorf("%s %s from %s: got %v, %v; want %v", proto, addr, from, got, err, want)
		}
	}
}

// wantError checks that asking addr over TCP and UDP fails as ok says.
func wantError(t *testing.T, from *netnstest.NS, addr netip.AddrPort, d time.Duration, what string, ok func(error) bool) {
	t.Helper()
	for _, proto := range []string{"tcp", "udp"} {
		got, err := ask(from, proto, addr, d)
		if err == nil || !ok(err) {
			t.Errorf("%s %s from %s: got %v, %v; want %s", proto, addr, from, got, err, what)
		}
	}
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.Is(err, os.ErrDeadlineExceeded) && errors.As(err, &ne) && ne.Timeout() &&
		!errors.Is(err, syscall.ECONNREFUSED)
}

func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) && !errors.Is(err, os.ErrDeadlineExceeded)
}

func isUnreachable(err error) bool {
	return (errors.Is(err, syscall.EHOSTUNREACH) || errors.Is(err, syscall.ENETUNREACH)) &&
		!errors.Is(err, os.ErrDeadlineExceeded)
}

func at(a netip.Addr, port uint16) netip.AddrPort { return netip.AddrPortFrom(a, port) }

func TestTopology(t *testing.T) {
	tp := netnstest.NewTopology(t, 2)
	for _, p := range tp.Pods {
		p.ServeTCP(t, ":8080", p.Name)
		p.ServeUDP(t, ":8080", p.Name)
	}
	pod0, pod1 := tp.Pods[0], tp.Pods[1]

	t.Run("addresses", func(t *testing.T) {
		for i, want := range []string{"10.1.0.11", "10.1.0.12"} {
			if got := tp.Pods[i].IPv4.String(); got != want {
				t.Errorf("pod%d IPv4 %s, want %s", i, got, want)
			}
		}
		if got := pod1.IPv6.String(); got != "fd00:10::12" {
			t.Errorf("pod1 IPv6 %s, want fd00:10::12", got)
		}
	})

	t.Run("client reaches pods through the node without NAT", func(t *testing.T) {
		for _, p := range tp.Pods {
			wantReply(t, tp.Client, at(p.IPv4, 8080), netnstest.Reply{Server: p.Name, Source: tp.ClientIPv4})
			wantReply(t, tp.Client, at(p.IPv6, 8080), netnstest.Reply{Server: p.Name, Source: tp.ClientIPv6})
		}
	})

	t.Run("pod reaches pod", func(t *testing.T) {
		wantReply(t, pod1.NS, at(pod0.IPv4, 8080), netnstest.Reply{Server: pod0.Name, Source: pod1.IPv4})
		wantReply(t, pod0.NS, at(pod1.IPv6, 8080), netnstest.Reply{Server: pod1.Name, Source: pod0.IPv6})
	})

	t.Run("node reaches pod from the gateway address", func(t *testing.T) {
		wantReply(t, tp.Node, at(pod0.IPv4, 8080), netnstest.Reply{Server: pod0.Name, Source: tp.GatewayIPv4})
		wantReply(t, tp.Node, at(pod0.IPv6, 8080), netnstest.Reply{Server: pod0.Name, Source: tp.GatewayIPv6})
	})

	t.Run("held connection keeps answering", func(t *testing.T) {
		c, hello, err := tp.Client.DialTCP(at(pod1.IPv6, 8080).String(), timeout)
		if err != nil {
			t.Fatal(err)
		}
		defer func() { _ = c.Close() }()
		want := netnstest.Reply{Server: pod1.Name, Source: tp.ClientIPv6}
		if hello != want {
			t.Errorf("greeting %v, want %v", hello, want)
		}
		if got := c.LocalAddr().Addr(); got != tp.ClientIPv6 {
			t.Errorf("local address %v, want %v", got, tp.ClientIPv6)
		}
		for range 3 {
			if got, err := c.Ask(); err != nil || got != want {
				t.Errorf("ask: %v, %v; want %v", got, err, want)
			}
		}
	})

	t.Run("no listener is refused", func(t *testing.T) {
		wantError(t, tp.Client, at(pod0.IPv4, 9), timeout, "ECONNREFUSED", isRefused)
		wantError(t, tp.Client, at(pod0.IPv6, 9), timeout, "ECONNREFUSED", isRefused)
	})

	t.Run("unknown address is lost in the sink", func(t *testing.T) {
		before := txPackets(t, tp.Node, tp.NodeSinkIface)
		wantError(t, tp.Client, netip.MustParseAddrPort("10.96.0.10:80"), lost, "timeout", isTimeout)
		wantError(t, tp.Client, netip.MustParseAddrPort("[fd00:96::10]:80"), lost, "timeout", isTimeout)
		wantError(t, pod0.NS, netip.MustParseAddrPort("10.96.0.10:80"), lost, "timeout", isTimeout)
		if sent := txPackets(t, tp.Node, tp.NodeSinkIface) - before; sent < 6 {
			t.Errorf("node sent %d packets to the sink, want at least the 6 asked", sent)
		}
	})

	t.Run("unreachable is told apart", func(t *testing.T) {
		tp.Node.IP(t, "-4", "route", "add", "unreachable", "10.99.0.0/16")
		tp.Node.IP(t, "-6", "route", "add", "unreachable", "fd00:99::/64")
		wantError(t, tp.Client, netip.MustParseAddrPort("10.99.0.1:80"), timeout, "unreachable", isUnreachable)
		wantError(t, tp.Client, netip.MustParseAddrPort("[fd00:99::1]:80"), timeout, "unreachable", isUnreachable)
		lonely := netnstest.New(t, "lonely") // no routes at all
		wantError(t, lonely, netip.MustParseAddrPort("10.1.0.11:8080"), timeout, "unreachable", isUnreachable)
	})

	t.Run("hairpin through the node", func(t *testing.T) {
		if _, err := exec.LookPath("nft"); err != nil {
			t.Skip("needs nft to DNAT in the node")
		}
		// A service address DNATed to pod0, masqueraded when pod0 reaches
		// itself, as a proxy does.
		tp.Node.Exec(t, "nft", `
			table inet npxhairpin {
				chain pre {
					type nat hook prerouting priority dstnat;
					ip daddr 10.96.0.10 meta l4proto { tcp, udp } th dport 80 dnat ip to 10.1.0.11:8080
					ip6 daddr fd00:96::10 meta l4proto { tcp, udp } th dport 80 dnat ip6 to [fd00:10::11]:8080
				}
				chain post {
					type nat hook postrouting priority srcnat;
					ip saddr 10.1.0.11 ip daddr 10.1.0.11 masquerade
					ip6 saddr fd00:10::11 ip6 daddr fd00:10::11 masquerade
				}
			}`)
		t.Cleanup(func() { tp.Node.Exec(t, "nft", "delete table inet npxhairpin") })
		vip4, vip6 := netip.MustParseAddrPort("10.96.0.10:80"), netip.MustParseAddrPort("[fd00:96::10]:80")
		wantReply(t, pod0.NS, vip4, netnstest.Reply{Server: pod0.Name, Source: tp.GatewayIPv4})
		wantReply(t, pod0.NS, vip6, netnstest.Reply{Server: pod0.Name, Source: tp.GatewayIPv6})
		wantReply(t, tp.Client, vip4, netnstest.Reply{Server: pod0.Name, Source: tp.ClientIPv4})
		if !tp.BridgeNetfilter {
			t.Skip("without br_netfilter, pod0's reply to pod1 bypasses the node's conntrack")
		}
		wantReply(t, pod1.NS, vip4, netnstest.Reply{Server: pod0.Name, Source: pod1.IPv4})
		wantReply(t, pod1.NS, vip6, netnstest.Reply{Server: pod0.Name, Source: pod1.IPv6})
	})

	t.Run("later pod", func(t *testing.T) {
		p := tp.AddPod(t)
		if p.Name != "pod2" || p.IPv4.String() != "10.1.0.13" || p.IPv6.String() != "fd00:10::13" {
			t.Fatalf("third pod is %s %s %s", p.Name, p.IPv4, p.IPv6)
		}
		p.ServeTCP(t, at(p.IPv4, 80).String(), p.Name)
		p.ServeUDP(t, at(p.IPv4, 80).String(), p.Name)
		wantReply(t, tp.Client, at(p.IPv4, 80), netnstest.Reply{Server: p.Name, Source: tp.ClientIPv4})
	})
}

// txPackets is how many packets dev in ns has sent.
func txPackets(t *testing.T, ns *netnstest.NS, dev string) uint64 {
	t.Helper()
	var links []struct {
		Stats struct {
			TX struct {
				Packets uint64 `json:"packets"`
			} `json:"tx"`
		} `json:"stats64"`
	}
	out := ns.IP(t, "-j", "-s", "link", "show", "dev", dev)
	if err := json.Unmarshal([]byte(out), &links); err != nil || len(links) != 1 {
		t.Fatalf("ip -s link show %s: %v in %q", dev, err, out)
	}
	return links[0].Stats.TX.Packets
}

func netnsList(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v\n%s", err, out)
	}
	var names []string
	for _, line := range strings.Split(string(out), "\n") {
		if f := strings.Fields(line); len(f) > 0 {
			names = append(names, f[0]) // "name (id: 3)"
		}
	}
	return names
}

func TestCleanupRemovesNamespaces(t *testing.T) {
	netnstest.Require(t)
	var created []string
	t.Run("build", func(t *testing.T) {
		tp := netnstest.NewTopology(t, 1)
		p := tp.AddPod(t)
		p.ServeTCP(t, ":8080", p.Name)
		if _, err := tp.Client.AskTCP(at(p.IPv4, 8080).String(), timeout); err != nil {
			t.Fatal(err)
		}
		created = []string{tp.Node.Name, tp.Client.Name, tp.Sink.Name, tp.Pods[0].NS.Name, p.NS.Name}
		list := netnsList(t)
		for _, name := range created {
			if !slices.Contains(list, name) {
				t.Errorf("%s missing from ip netns list %q", name, list)
			}
		}
	})
	list := netnsList(t)
	for _, name := range created {
		if slices.Contains(list, name) {
			t.Errorf("%s still in ip netns list after cleanup", name)
		}
	}
}

func netnsInode(t *testing.T, path string) uint64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Sys().(*syscall.Stat_t).Ino
}

func TestDoLeavesCallerInItsNamespace(t *testing.T) {
	ns := netnstest.New(t, "do")
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	const self = "/proc/thread-self/ns/net"
	before := netnsInode(t, self)
	target := netnsInode(t, ns.Path())
	if before == target {
		t.Fatal("test already runs in the new namespace")
	}

	var inside uint64
	if err := ns.Do(func() error {
		fi, err := os.Stat(self)
		if err == nil {
			inside = fi.Sys().(*syscall.Stat_t).Ino
		}
		return err
	}); err != nil {
		t.Fatal(err)
	}
	if inside != target {
		t.Errorf("fn ran in namespace %d, want %d", inside, target)
	}
	if after := netnsInode(t, self); after != before {
		t.Errorf("caller's thread moved from namespace %d to %d", before, after)
	}

	wantErr := errors.New("from fn")
	if err := ns.Do(func() error { return wantErr }); !errors.Is(err, wantErr) {
		t.Errorf("Do returned %v, want fn's error", err)
	}
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v, want fn's panic", r)
			}
		}()
		_ = ns.Do(func() error { panic("boom") })
	}()

	// Threads Do used go back to the pool only after switching back: many
	// goroutines on pooled threads must all find the original namespace.
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() { _ = ns.Do(func() error { return nil }) })
	}
	wg.Wait()
	inodes := make(chan uint64, 64)
	for range 64 {
		wg.Go(func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			if fi, err := os.Stat(self); err == nil {
				inodes <- fi.Sys().(*syscall.Stat_t).Ino
			}
		})
	}
	wg.Wait()
	close(inodes)
	for ino := range inodes {
		if ino != before {
			t.Fatalf("a pooled thread is in namespace %d, want %d", ino, before)
		}
	}
}
