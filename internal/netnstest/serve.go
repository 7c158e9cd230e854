package netnstest

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// Reply is what a test server answers: its name and the client address it
// saw (no port), so a test can tell which backend a proxy picked and
// whether it masqueraded the client.
type Reply struct {
	Server string
	Source netip.Addr
}

func (r Reply) String() string { return r.Server + " " + r.Source.String() }

func (r Reply) line() string { return r.String() + "\n" }

func parseReply(s string) (Reply, error) {
	f := strings.Fields(s)
	if len(f) != 2 {
		return Reply{}, fmt.Errorf("malformed reply %q", s)
	}
	a, err := netip.ParseAddr(f[1])
	if err != nil {
		return Reply{}, fmt.Errorf("malformed reply %q: %w", s, err)
	}
	return Reply{Server: f[0], Source: a}, nil
}

// sourceOf is the client address a server reports; IPv4 clients of a
// dual-stack socket show as themselves, not as ::ffff:a.b.c.d.
func sourceOf(a net.Addr) netip.Addr {
	switch a := a.(type) {
	case *net.TCPAddr:
		return a.AddrPort().Addr().Unmap()
	case *net.UDPAddr:
		return a.AddrPort().Addr().Unmap()
	}
	return netip.Addr{}
}

// ServeTCP listens on addr ("10.1.0.11:8080", "[fd00:10::11]:8080", or
// ":8080" for every address of the namespace) with a socket created inside
// the namespace. On each connection it writes "<name> <client ip>\n" at
// once, then answers every line the client sends with the same line, so a
// test can hold a connection open and check it still works. Listener and
// connections are closed at cleanup.
func (ns *NS) ServeTCP(t testing.TB, addr, name string) {
	t.Helper()
	var l net.Listener
	if err := ns.Do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		t.Fatalf("netnstest: %s: serving tcp %s: %v", ns.Name, addr, err)
	}
	s := newServer(t, fmt.Sprintf("tcp server %s in %s", addr, ns.Name))
	s.spawn(l, func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed at cleanup
			}
			s.spawn(c, func() { answerTCP(c, name) })
		}
	})
}

func answerTCP(c net.Conn, name string) {
	msg := Reply{Server: name, Source: sourceOf(c.RemoteAddr())}.line()
	if _, err := io.WriteString(c, msg); err != nil {
		return
	}
	lines := bufio.NewScanner(c)
	for lines.Scan() {
		if _, err := io.WriteString(c, msg); err != nil {
			return
		}
	}
}

// ServeUDP answers each datagram arriving at addr with
// "<name> <client ip>". With a wildcard addr (":5353") the kernel picks
// the reply's source address by routing; bind the address the client (or
// the proxy's DNAT) targets when that matters.
func (ns *NS) ServeUDP(t testing.TB, addr, name string) {
	t.Helper()
	var pc net.PacketConn
	if err := ns.Do(func() (err error) { pc, err = net.ListenPacket("udp", addr); return err }); err != nil {
		t.Fatalf("netnstest: %s: serving udp %s: %v", ns.Name, addr, err)
	}
	s := newServer(t, fmt.Sprintf("udp server %s in %s", addr, ns.Name))
	s.spawn(pc, func() {
		buf := make([]byte, 2048)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return // closed at cleanup
			}
			_, _ = pc.WriteTo([]byte(Reply{Server: name, Source: sourceOf(from)}.String()), from)
		}
	})
}

// server tracks a test server's sockets and goroutines, so that cleanup
// closes every socket and waits for every goroutine.
type server struct {
	what   string
	mu     sync.Mutex
	closed bool
	socks  map[io.Closer]struct{}
	wg     sync.WaitGroup
}

func newServer(t testing.TB, what string) *server {
	s := &server{what: what, socks: map[io.Closer]struct{}{}}
	t.Cleanup(func() { s.close(t) })
	return s
}

// spawn runs fn on a goroutine and closes sock when fn returns or at
// cleanup, whichever comes first.
func (s *server) spawn(sock io.Closer, fn func()) {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		_ = sock.Close()
		return
	}
	s.socks[sock] = struct{}{}
	s.wg.Add(1)
	s.mu.Unlock()
	go func() {
		defer s.wg.Done()
		defer func() {
			s.mu.Lock()
			delete(s.socks, sock)
			s.mu.Unlock()
			_ = sock.Close()
		}()
		fn()
	}()
}

func (s *server) close(t testing.TB) {
	s.mu.Lock()
	s.closed = true
	for c := range s.socks {
		_ = c.Close()
	}
	s.mu.Unlock()
	done := make(chan struct{})
	go func() { s.wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(readyTimeout):
		t.Errorf("netnstest: %s: goroutines still running %v after close", s.what, readyTimeout)
	}
}

// AskTCP connects to addr from inside the namespace, reads the server's
// greeting and closes. See DialTCP for the errors.
func (ns *NS) AskTCP(addr string, timeout time.Duration) (Reply, error) {
	c, r, err := ns.DialTCP(addr, timeout)
	if err != nil {
		return Reply{}, err
	}
	_ = c.Close()
	return r, nil
}

// AskUDP sends one datagram to addr from inside the namespace and returns
// the answer. The errors are those of DialTCP: no answer within timeout
// is a timeout, an ICMP port unreachable is syscall.ECONNREFUSED.
func (ns *NS) AskUDP(addr string, timeout time.Duration) (Reply, error) {
	deadline := time.Now().Add(timeout)
	c, err := ns.dial("udp", addr, deadline)
	if err != nil {
		return Reply{}, ns.opError("dial udp", addr, err)
	}
	defer func() { _ = c.Close() }()
	_ = c.SetDeadline(deadline)
	if _, err := io.WriteString(c, "?"); err != nil {
		return Reply{}, ns.opError("ask udp", addr, err)
	}
	buf := make([]byte, 2048)
	n, err := c.Read(buf)
	if err != nil {
		return Reply{}, ns.opError("ask udp", addr, err)
	}
	r, err := parseReply(string(buf[:n]))
	if err != nil {
		return Reply{}, ns.opError("ask udp", addr, err)
	}
	return r, nil
}

// Conn is an open connection to a ServeTCP server.
type Conn struct {
	ns      *NS
	addr    string
	c       net.Conn
	r       *bufio.Reader
	timeout time.Duration
}

// DialTCP connects to addr with a socket created inside the namespace and
// reads the server's greeting, which it returns; timeout bounds the dial
// and the greeting together, and then each Ask. The errors tell the cases
// apart: errors.Is(err, syscall.ECONNREFUSED) for no listener (a reset),
// errors.Is(err, os.ErrDeadlineExceeded) and net.Error's Timeout for no
// answer (packets lost), syscall.EHOSTUNREACH or ENETUNREACH for an ICMP
// unreachable or no route. Over veth an ICMPv6 error for the SYN can come
// back while connect still holds the socket, and the kernel drops it
// (TcpExtLockDroppedIcmps); the retransmitted SYN, a second later, gets
// the error through: give an IPv6 dial that should be unreachable more
// than a second.
func (ns *NS) DialTCP(addr string, timeout time.Duration) (*Conn, Reply, error) {
	deadline := time.Now().Add(timeout)
	c, err := ns.dial("tcp", addr, deadline)
	if err != nil {
		return nil, Reply{}, ns.opError("dial tcp", addr, err)
	}
	conn := &Conn{ns: ns, addr: addr, c: c, r: bufio.NewReader(c), timeout: timeout}
	r, err := conn.readReply(deadline)
	if err != nil {
		_ = c.Close()
		return nil, Reply{}, err
	}
	return conn, r, nil
}

// dial creates the socket and connects inside the namespace (a socket
// belongs to the namespace it was created in; connect waits at most until
// deadline). Reads and writes happen later, on any thread.
func (ns *NS) dial(network, addr string, deadline time.Time) (net.Conn, error) {
	var c net.Conn
	err := ns.Do(func() (err error) {
		d := net.Dialer{Deadline: deadline}
		if network == "udp" {
			d.Control = func(network, _ string, c syscall.RawConn) error { return reportUnreachable(network, c) }
		}
		c, err = d.Dial(network, addr)
		return err
	})
	return c, err
}

// Ask sends a line and reads the server's answer, within the timeout
// given to DialTCP. A connection the proxy broke shows as
// syscall.ECONNRESET, io.EOF or a timeout.
func (c *Conn) Ask() (Reply, error) {
	deadline := time.Now().Add(c.timeout)
	_ = c.c.SetDeadline(deadline)
	if _, err := io.WriteString(c.c, "?\n"); err != nil {
		return Reply{}, c.ns.opError("ask tcp", c.addr, err)
	}
	return c.readReply(deadline)
}

func (c *Conn) readReply(deadline time.Time) (Reply, error) {
	_ = c.c.SetDeadline(deadline)
	line, err := c.r.ReadString('\n')
	if err == nil {
		var r Reply
		if r, err = parseReply(line); err == nil {
			return r, nil
		}
	}
	return Reply{}, c.ns.opError("read tcp", c.addr, err)
}

// LocalAddr is the client's end of the connection, to find it in
// conntrack, for instance.
func (c *Conn) LocalAddr() netip.AddrPort { return c.c.LocalAddr().(*net.TCPAddr).AddrPort() }

// Close closes the connection.
func (c *Conn) Close() error { return c.c.Close() }

// opError is the error of the client helpers. It names the namespace and
// the target, and is a net.Error. Every timeout also matches
// os.ErrDeadlineExceeded: package net reports a dial timeout as matching
// only context.DeadlineExceeded, a read timeout only
// os.ErrDeadlineExceeded, and tests should not need to know which.
type opError struct {
	ns, op, addr string
	err          error
}

func (ns *NS) opError(op, addr string, err error) error {
	return &opError{ns: ns.Name, op: op, addr: addr, err: err}
}

func (e *opError) Error() string { return fmt.Sprintf("%s: %s %s: %v", e.ns, e.op, e.addr, e.err) }

func (e *opError) Unwrap() []error {
	if e.Timeout() {
		return []error{e.err, os.ErrDeadlineExceeded}
	}
	return []error{e.err}
}

// Timeout reports whether the operation failed for lack of an answer.
func (e *opError) Timeout() bool {
	var ne net.Error
	return errors.As(e.err, &ne) && ne.Timeout() || errors.Is(e.err, os.ErrDeadlineExceeded)
}

// Temporary is part of net.Error; deprecated there, always false here.
func (e *opError) Temporary() bool { return false }
