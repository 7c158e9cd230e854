package dataplane

import (
	"bufio"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// Kernel tests build their own little network out of namespaces: a node
// where the ruleset is applied, pods behind it on their own veths, a client
// outside the cluster, and a sink the node's default route leads to (so a
// packet the rules fail to catch leaves the node and is lost, as off a
// real node). Servers in the pods answer with their name and the source
// address they saw.

var nsCounter atomic.Int32

func requireKernel(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("kernel test: needs root (network namespaces and nftables)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("kernel test: needs iproute2 (`ip`)")
	}
}

type netns struct {
	name string
}

func newNetns(t testing.TB, role string) *netns {
	t.Helper()
	n := &netns{name: fmt.Sprintf("npx%d-%d-%s", os.Getpid(), nsCounter.Add(1), role)}
	run(t, "ip", "netns", "add", n.name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", n.name).Run() })
	n.ip(t, "link", "set", "lo", "up")
	n.sysctl(t, "net.ipv6.conf.all.accept_dad", "0")
	n.sysctl(t, "net.ipv6.conf.default.accept_dad", "0")
	return n
}

func run(t testing.TB, argv ...string) string {
	t.Helper()
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v\n%s", strings.Join(argv, " "), err, out)
	}
	return string(out)
}

func (n *netns) path() string { return "/run/netns/" + n.name }

func (n *netns) ip(t testing.TB, args ...string) {
	run(t, append([]string{"ip", "-n", n.name}, args...)...)
}

func (n *netns) exec(t testing.TB, argv ...string) string {
	return run(t, append([]string{"ip", "netns", "exec", n.name}, argv...)...)
}

func (n *netns) sysctl(t testing.TB, key, value string) {
	n.exec(t, "sh", "-c", fmt.Sprintf("echo %s > /proc/sys/%s", value, strings.ReplaceAll(key, ".", "/")))
}

// do runs fn on an OS thread switched into the namespace; sockets fn
// creates stay in it.
func (n *netns) do(fn func() error) error {
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer func() { _ = orig.Close() }()
	target, err := os.Open(n.path())
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer func() { _ = target.Close() }()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return err
	}
	ferr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return errors.Join(ferr, err) // the thread stays locked and dies with the goroutine
	}
	runtime.UnlockOSThread()
	return ferr
}

var linkCounter atomic.Int32

// link joins two namespaces with a veth pair and returns the interface
// names.
func link(t testing.TB, a *netns, aAddrs []string, b *netns, bAddrs []string) (string, string) {
	t.Helper()
	id := linkCounter.Add(1)
	ai, bi := fmt.Sprintf("va%d", id), fmt.Sprintf("vb%d", id)
	// Distinct interface indexes for the two ends: when a veth's index
	// equals its peer's (both 2 in fresh namespaces), kernel 6.x brings
	// the carrier up about a second late.
	run(t, "ip", "link", "add", ai, "index", fmt.Sprint(1000+2*id), "netns", a.name, "type", "veth",
		"peer", "name", bi, "index", fmt.Sprint(1001+2*id), "netns", b.name)
	for _, x := range []struct {
		ns    *netns
		iface string
		addrs []string
	}{{a, ai, aAddrs}, {b, bi, bAddrs}} {
		for _, ad := range x.addrs {
			x.ns.ip(t, "addr", "add", ad, "dev", x.iface, "nodad")
		}
		x.ns.ip(t, "link", "set", x.iface, "up")
	}
	return ai, bi
}

type pod struct {
	*netns
	name       string
	ipv4, ipv6 netip.Addr
}

type topology struct {
	node, client, sink *netns
	pods               []*pod
}

func newTopology(t testing.TB, pods int) *topology {
	tp := &topology{node: newNetns(t, "node"), client: newNetns(t, "client"), sink: newNetns(t, "sink")}
	tp.node.sysctl(t, "net.ipv4.ip_forward", "1")
	tp.node.sysctl(t, "net.ipv6.conf.all.forwarding", "1")
	link(t, tp.client, []string{"192.168.0.2/24", "fd00:1::2/64"}, tp.node, []string{"192.168.0.1/24", "fd00:1::1/64"})
	tp.client.ip(t, "route", "add", "default", "via", "192.168.0.1")
	tp.client.ip(t, "-6", "route", "add", "default", "via", "fd00:1::1")
	link(t, tp.sink, []string{"192.168.255.2/30", "fd00:ff::2/64"}, tp.node, []string{"192.168.255.1/30", "fd00:ff::1/64"})
	tp.node.ip(t, "route", "add", "default", "via", "192.168.255.2")
	tp.node.ip(t, "-6", "route", "add", "default", "via", "fd00:ff::2")
	for range pods {
		tp.addPod(t)
	}
	return tp
}

func (tp *topology) addPod(t testing.TB) *pod {
	i := len(tp.pods)
	p := &pod{netns: newNetns(t, fmt.Sprintf("pod%d", i)), name: fmt.Sprintf("pod%d", i),
		ipv4: netip.AddrFrom4([4]byte{10, 1, 0, byte(11 + i)}), ipv6: netip.MustParseAddr(fmt.Sprintf("fd00:10::%x", 0x11+i))}
	// Each pod on its own veth with a host route, as most CNIs do, so
	// pod-to-pod traffic is routed through the node (and its conntrack).
	podIf, nodeIf := link(t, p.netns, []string{p.ipv4.String() + "/32", p.ipv6.String() + "/128"}, tp.node, []string{"10.1.0.1/32", "fd00:10::1/128"})
	p.ip(t, "route", "add", "10.1.0.1", "dev", podIf)
	p.ip(t, "route", "add", "default", "via", "10.1.0.1", "dev", podIf)
	p.ip(t, "-6", "route", "add", "fd00:10::1", "dev", podIf)
	p.ip(t, "-6", "route", "add", "default", "via", "fd00:10::1", "dev", podIf)
	tp.node.ip(t, "route", "add", p.ipv4.String()+"/32", "dev", nodeIf)
	tp.node.ip(t, "-6", "route", "add", p.ipv6.String()+"/128", "dev", nodeIf)
	tp.pods = append(tp.pods, p)
	return p
}

// reply is what a test server answers.
type reply struct {
	server string
	source netip.Addr
}

// serveTCP answers each connection with "<name> <source>\n", and again
// for every line the client sends.
func (n *netns) serveTCP(t testing.TB, addr, name string) {
	t.Helper()
	var l net.Listener
	if err := n.do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				src := c.RemoteAddr().(*net.TCPAddr).AddrPort().Addr().Unmap()
				msg := fmt.Sprintf("%s %s\n", name, src)
				if _, err := c.Write([]byte(msg)); err != nil {
					return
				}
				r := bufio.NewReader(c)
				for {
					if _, err := r.ReadString('\n'); err != nil {
						return
					}
					if _, err := c.Write([]byte(msg)); err != nil {
						return
					}
				}
			}()
		}
	}()
}

func (n *netns) serveUDP(t testing.TB, addr, name string) {
	t.Helper()
	var pc net.PacketConn
	if err := n.do(func() (err error) { pc, err = net.ListenPacket("udp", addr); return err }); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pc.Close() })
	go func() {
		buf := make([]byte, 512)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return
			}
			src := from.(*net.UDPAddr).AddrPort().Addr().Unmap()
			_, _ = pc.WriteTo([]byte(fmt.Sprintf("%s %s", name, src)), from)
		}
	}()
}

func parseReply(s string) (reply, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return reply{}, fmt.Errorf("bad reply %q", s)
	}
	a, err := netip.ParseAddr(f[1])
	return reply{f[0], a}, err
}

// tcpConn is an open connection to a test server.
type tcpConn struct {
	net.Conn
	r *bufio.Reader
}

func (n *netns) dialTCP(addr string, timeout time.Duration) (*tcpConn, reply, error) {
	var c net.Conn
	err := n.do(func() (err error) {
		d := net.Dialer{Timeout: timeout}
		c, err = d.Dial("tcp", addr)
		return err
	})
	if err != nil {
		return nil, reply{}, err
	}
	tc := &tcpConn{Conn: c, r: bufio.NewReader(c)}
	_ = c.SetDeadline(time.Now().Add(timeout))
	line, err := tc.r.ReadString('\n')
	if err != nil {
		_ = c.Close()
		return nil, reply{}, err
	}
	rep, err := parseReply(line)
	return tc, rep, err
}

func (c *tcpConn) ask(timeout time.Duration) (reply, error) {
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("again\n")); err != nil {
		return reply{}, err
	}
	line, err := c.r.ReadString('\n')
	if err != nil {
		return reply{}, err
	}
	return parseReply(line)
}

func (n *netns) askTCP(addr string, timeout time.Duration) (reply, error) {
	c, rep, err := n.dialTCP(addr, timeout)
	if err == nil {
		_ = c.Close()
	}
	return rep, err
}

func (n *netns) askUDP(addr string, timeout time.Duration) (reply, error) {
	var c net.Conn
	if err := n.do(func() (err error) { c, err = net.Dial("udp", addr); return err }); err != nil {
		return reply{}, err
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(time.Now().Add(timeout))
	if _, err := c.Write([]byte("q")); err != nil {
		return reply{}, err
	}
	buf := make([]byte, 512)
	k, err := c.Read(buf)
	if err != nil {
		return reply{}, err
	}
	return parseReply(string(buf[:k]))
}
