package conntrack

import (
	"context"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	ct "github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

const (
	askTimeout = 2 * time.Second
	// lostWait is how long to wait for an answer that must not come.
	lostWait = 300 * time.Millisecond
)

// dnat programs a minimal Service proxy in a namespace: UDP to a frontend
// is DNATed to one endpoint, in an inet table of the test's own.
type dnat struct {
	conn  *nftables.Conn
	chain *nftables.Chain
}

func newDNAT(t *testing.T, ns *netnstest.NS) *dnat {
	t.Helper()
	f, err := os.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	// google/nftables opens a socket in the namespace at every Flush.
	t.Cleanup(func() { _ = f.Close() })
	conn, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	table := conn.AddTable(&nftables.Table{Family: nftables.TableFamilyINet, Name: "cttest"})
	chain := conn.AddChain(&nftables.Chain{
		Name: "prerouting", Table: table, Type: nftables.ChainTypeNAT,
		Hooknum: nftables.ChainHookPrerouting, Priority: nftables.ChainPriorityNATDest,
	})
	if err := conn.Flush(); err != nil {
		t.Fatalf("creating the nat chain: %v", err)
	}
	return &dnat{conn: conn, chain: chain}
}

// set replaces the rules: UDP to each frontend goes to its endpoint;
// frontends not listed are not DNATed.
func (d *dnat) set(t *testing.T, rules map[netip.AddrPort]netip.AddrPort) {
	t.Helper()
	d.conn.FlushChain(d.chain)
	for front, ep := range rules {
		nfproto, daddrOff, daddrLen := byte(unix.NFPROTO_IPV4), uint32(16), uint32(4)
		if front.Addr().Is6() {
			nfproto, daddrOff, daddrLen = unix.NFPROTO_IPV6, 24, 16
		}
		d.conn.AddRule(&nftables.Rule{Table: d.chain.Table, Chain: d.chain, Exprs: []expr.Any{
			&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{nfproto}},
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: 1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: []byte{unix.IPPROTO_UDP}},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseNetworkHeader, Offset: daddrOff, Len: daddrLen},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: front.Addr().AsSlice()},
			&expr.Payload{DestRegister: 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			&expr.Cmp{Op: expr.CmpOpEq, Register: 1, Data: binaryutil.BigEndian.PutUint16(front.Port())},
			&expr.Immediate{Register: 1, Data: ep.Addr().AsSlice()},
			&expr.Immediate{Register: 2, Data: binaryutil.BigEndian.PutUint16(ep.Port())},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(nfproto), RegAddrMin: 1, RegProtoMin: 2, Specified: true},
		}})
	}
	if err := d.conn.Flush(); err != nil {
		t.Fatalf("programming DNAT: %v", err)
	}
}

// client is a UDP socket in the client namespace: every datagram it
// sends has the same source port, as a resolver's do.
type client struct {
	c *net.UDPConn
}

func dialClient(t *testing.T, ns *netnstest.NS, to netip.AddrPort) *client {
	t.Helper()
	var c *net.UDPConn
	if err := ns.Do(func() (err error) {
		c, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(to))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &client{c: c}
}

func (c *client) addr() netip.AddrPort {
	a := c.c.LocalAddr().(*net.UDPAddr).AddrPort()
	return netip.AddrPortFrom(a.Addr().Unmap(), a.Port())
}

// ask sends a datagram and returns the name of the server that answered,
// or "" when none did within wait.
func (c *client) ask(t *testing.T, wait time.Duration) string {
	t.Helper()
	if _, err := c.c.Write([]byte("?")); err != nil {
		t.Fatalf("send from %s: %v", c.addr(), err)
	}
	_ = c.c.SetReadDeadline(time.Now().Add(wait))
	buf := make([]byte, 512)
	n, err := c.c.Read(buf)
	if err != nil {
		return ""
	}
	if f := strings.Fields(string(buf[:n])); len(f) > 0 {
		return f[0]
	}
	return ""
}

// wantServer checks who answers c now.
func wantServer(t *testing.T, c *client, want, why string) {
	t.Helper()
	wait := askTimeout
	if want == "" {
		wait = lostWait
	}
	if got := c.ask(t, wait); got != want {
		if want == "" {
			want = "no answer"
		}
		if got == "" {
			got = "no answer"
		}
		t.Errorf("%s: client %s got %s, want %s", why, c.addr(), got, want)
	}
}

// entryOf is c's conntrack entry in the node's table, if any.
func entryOf(t *testing.T, conn *ct.Conn, c *client) (ct.Flow, bool) {
	t.Helper()
	flows, err := conn.Dump(nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range flows {
		o := f.TupleOrig
		if o.Proto.Protocol == unix.IPPROTO_UDP && netip.AddrPortFrom(o.IP.SourceAddress.Unmap(), o.Proto.SourcePort) == c.addr() {
			return f, true
		}
	}
	return ct.Flow{}, false
}

// TestDeleteRealTraffic sends UDP through a DNAT on a node namespace and
// checks what the agent's cleanup is for: a client whose entry points at a
// removed endpoint keeps being sent there until Delete, and after Delete
// its next datagram, from the same source port, reaches a new endpoint,
// while a client of a live endpoint keeps its entry (and so its
// endpoint, though the rule now picks another). Then: a client that sent
// while the Service had no endpoints is stuck on its un-NATed entry after
// the Service gains one, until a frontend-only Delete, which leaves the
// DNATed entries of clients that came since alone.
func TestDeleteRealTraffic(t *testing.T) {
	for _, fam := range []struct {
		name      string
		vip, vip2 netip.Addr
		podAddr   func(*netnstest.Pod) netip.Addr
	}{
		{"ipv4", addr("10.96.0.10"), addr("10.96.0.11"), func(p *netnstest.Pod) netip.Addr { return p.IPv4 }},
		{"ipv6", addr("fd00:96::10"), addr("fd00:96::11"), func(p *netnstest.Pod) netip.Addr { return p.IPv6 }},
	} {
		t.Run(fam.name, func(t *testing.T) {
			tp := netnstest.NewTopology(t, 3)
			for _, p := range tp.Pods {
				p.ServeUDP(t, ":5353", p.Name)
			}
			pod := func(i int) netip.AddrPort { return at(fam.podAddr(tp.Pods[i]), 5353) }
			front, front2 := at(fam.vip, 53), at(fam.vip2, 53)
			nat := newDNAT(t, tp.Node)
			conn := dialCT(t, tp.Node)
			cleaner, err := New(WithNetNS(tp.Node.Path()))
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = cleaner.Close() }()
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()

			// Two clients, NATed to pod0 and pod1 while each was the
			// Service's endpoint.
			nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(0)})
			stale := dialClient(t, tp.Client, front)
			wantServer(t, stale, "pod0", "first endpoint")
			nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(1)})
			live := dialClient(t, tp.Client, front)
			wantServer(t, live, "pod1", "second endpoint")
			liveEntry, ok := entryOf(t, conn, live)
			if !ok {
				t.Fatalf("no conntrack entry for %s", live.addr())
			}

			// pod0 is removed and pod2 added: the rule picks pod2 now.
			// The stale client sticks to pod0 (which still answers
			// here, where a real removed pod would not).
			nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(2)})
			wantServer(t, stale, "pod0", "before Delete, the entry still leads to the removed endpoint")

			n, err := cleaner.Delete(ctx, []Flow{{Frontend: front, Endpoint: pod(0)}})
			if err != nil || n != 1 {
				t.Fatalf("Delete = %d, %v; want 1, nil", n, err)
			}
			if e, ok := entryOf(t, conn, stale); ok {
				t.Errorf("entry to the removed endpoint survived: %v", e)
			}
			if e, ok := entryOf(t, conn, live); !ok || e.ID != liveEntry.ID {
				t.Errorf("entry to the live endpoint gone or replaced: %v, %v", e, ok)
			}
			wantServer(t, stale, "pod2", "after Delete, the same source port reaches the new endpoint")
			wantServer(t, live, "pod1", "the live endpoint's client keeps its entry")

			// A Service without endpoints (no rule): the datagram goes
			// out un-NATed, to the node's sink, leaving an entry.
			early := dialClient(t, tp.Client, front2)
			wantServer(t, early, "", "Service without endpoints")
			nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(2), front2: pod(1)})
			wantServer(t, early, "", "Service gained an endpoint, but the un-NATed entry stays")
			// A client that came after the endpoint is DNATed already:
			// its entry is right and must survive the cleanup (which
			// runs after the write, so such clients race it).
			fresh := dialClient(t, tp.Client, front2)
			wantServer(t, fresh, "pod1", "a client that came after the endpoint")
			freshEntry, ok := entryOf(t, conn, fresh)
			if !ok {
				t.Fatalf("no conntrack entry for %s", fresh.addr())
			}
			n, err = cleaner.Delete(ctx, []Flow{{Frontend: front2}})
			if err != nil || n != 1 {
				t.Fatalf("frontend-only Delete = %d, %v; want 1, nil", n, err)
			}
			if e, ok := entryOf(t, conn, fresh); !ok || e.ID != freshEntry.ID {
				t.Errorf("the DNATed entry of a client that came after the endpoint was deleted: %v, %v", e, ok)
			}
			wantServer(t, early, "pod1", "after the frontend-only Delete")
			wantServer(t, live, "pod1", "other Services' clients untouched")
			wantServer(t, stale, "pod2", "other Services' clients untouched")
			if cleaner.noKernelFilter {
				t.Errorf("the Cleaner fell back to full dumps: the kernel's filter was ignored or rejected")
			}
		})
	}
}

// TestDeleteStaleRealTraffic: what a starting agent cleans in one pass:
// an entry to a removed endpoint and an un-NATed one go, entries to live
// endpoints and to other frontends stay.
func TestDeleteStaleRealTraffic(t *testing.T) {
	tp := netnstest.NewTopology(t, 3)
	for _, p := range tp.Pods {
		p.ServeUDP(t, ":5353", p.Name)
	}
	pod := func(i int) netip.AddrPort { return at(tp.Pods[i].IPv4, 5353) }
	front, front2, other := at(addr("10.96.0.10"), 53), at(addr("10.96.0.11"), 53), at(addr("10.96.0.12"), 53)
	nat := newDNAT(t, tp.Node)
	conn := dialCT(t, tp.Node)
	cleaner, err := New(WithNetNS(tp.Node.Path()))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = cleaner.Close() }()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()

	nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(0), other: pod(0)})
	stale := dialClient(t, tp.Client, front)
	wantServer(t, stale, "pod0", "first endpoint")
	otherClient := dialClient(t, tp.Client, other)
	wantServer(t, otherClient, "pod0", "another frontend")
	nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(1), other: pod(0)})
	live := dialClient(t, tp.Client, front)
	wantServer(t, live, "pod1", "second endpoint")
	early := dialClient(t, tp.Client, front2)
	wantServer(t, early, "", "no endpoints yet")
	liveEntry, _ := entryOf(t, conn, live)

	// While "no agent ran", pod0 left front and front2 got pod2.
	nat.set(t, map[netip.AddrPort]netip.AddrPort{front: pod(1), front2: pod(2), other: pod(0)})
	n, err := cleaner.DeleteStale(ctx, []Frontend{
		{Addr: front, Endpoints: []netip.AddrPort{pod(1)}},
		{Addr: front2, Endpoints: []netip.AddrPort{pod(2)}},
	})
	if err != nil || n != 2 {
		t.Fatalf("DeleteStale = %d, %v; want 2, nil", n, err)
	}
	wantServer(t, stale, "pod1", "the removed endpoint's client moved")
	wantServer(t, early, "pod2", "the un-NATed client reaches the new endpoint")
	if e, ok := entryOf(t, conn, live); !ok || e.ID != liveEntry.ID {
		t.Errorf("entry to the live endpoint gone or replaced: %v, %v", e, ok)
	}
	wantServer(t, otherClient, "pod0", "a frontend not listed is left alone")

	if _, err := cleaner.DeleteStale(ctx, []Frontend{{Addr: netip.AddrPortFrom(netip.IPv4Unspecified(), 53)}}); err == nil {
		t.Error("DeleteStale took an unspecified frontend")
	}
}
