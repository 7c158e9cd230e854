package netnstest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
	s, err := ns.ListenTCP(addr, name)
	serveUntilCleanup(t, s, err)
}

// ServeUDP answers each datagram arriving at addr with
// "<name> <client ip>". With a wildcard addr (":5353") the kernel picks
// the reply's source address by routing; bind the address the client (or
// the proxy's DNAT) targets when that matters.
func (ns *NS) ServeUDP(t testing.TB, addr, name string) {
	t.Helper()
	s, err := ns.ListenUDP(addr, name)
	serveUntilCleanup(t, s, err)
}

func serveUntilCleanup(t testing.TB, s *Server, err error) {
	t.Helper()
	if err != nil {
		t.Fatalf("netnstest: %v", err)
	}
	t.Cleanup(func() {
		if err := s.Close(); err != nil {
			t.Errorf("netnstest: %v", err)
		}
	})
}

// ListenTCP is ServeTCP for code without a testing.TB (a program, a
// TestMain): the caller stops the server with Close.
func (ns *NS) ListenTCP(addr, name string) (*Server, error) {
	var l net.Listener
	if err := ns.Do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		return nil, fmt.Errorf("%s: serving tcp %s: %w", ns.Name, addr, err)
	}
	s := newServer(fmt.Sprintf("tcp server %s in %s", addr, ns.Name))
	s.spawn(l, func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return // closed
			}
			s.spawn(c, func() { answerTCP(c, name) })
		}
	})
	return s, nil
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

// ListenUDP is ServeUDP for code without a testing.TB: the caller stops
// the server with Close.
func (ns *NS) ListenUDP(addr, name string) (*Server, error) {
	var pc net.PacketConn
	if err := ns.Do(func() (err error) { pc, err = net.ListenPacket("udp", addr); return err }); err != nil {
		return nil, fmt.Errorf("%s: serving udp %s: %w", ns.Name, addr, err)
	}
	s := newServer(fmt.Sprintf("udp server %s in %s", addr, ns.Name))
	s.spawn(pc, func() {
		buf := make([]byte, 2048)
		for {
			_, from, err := pc.ReadFrom(buf)
			if err != nil {
				return // closed
			}
			_, _ = pc.WriteTo([]byte(Reply{Server: name, Source: sourceOf(from)}.String()), from)
		}
	})
	return s, nil
}

// ListenHTTP serves HTTP on addr, answering every request with 200 and
// the body "<name> <client ip>\n" (what AskHTTP reads). The caller stops
// the server with Close.
func (ns *NS) ListenHTTP(addr, name string) (*Server, error) {
	var l net.Listener
	if err := ns.Do(func() (err error) { l, err = net.Listen("tcp", addr); return err }); err != nil {
		return nil, fmt.Errorf("%s: serving http %s: %w", ns.Name, addr, err)
	}
	hs := &http.Server{
		ReadHeaderTimeout: readyTimeout,
		Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			var source netip.Addr
			if ap, err := netip.ParseAddrPort(r.RemoteAddr); err == nil {
				source = ap.Addr().Unmap()
			}
			w.Header().Set("Content-Type", "text/plain")
			_, _ = io.WriteString(w, Reply{Server: name, Source: source}.line())
		}),
	}
	s := newServer(fmt.Sprintf("http server %s in %s", addr, ns.Name))
	s.spawn(hs, func() { _ = hs.Serve(l) })
	return s, nil
}

// Server is a running test server. It tracks its sockets and goroutines,
// so that Close closes every socket and waits for every goroutine.
type Server struct {
	what   string
	mu     sync.Mutex
	closed bool
	socks  map[io.Closer]struct{}
	wg     sync.WaitGroup
}

func newServer(what string) *Server {
	return &Server{what: what, socks: map[io.Closer]struct{}{}}
}

// spawn runs fn on a goroutine and closes sock when fn returns or at
// Close, whichever comes first.
func (s *Server) spawn(sock io.Closer, fn func()) {
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

// Close stops the server: it closes its sockets and waits for its
// goroutines, failing if they are still running after a few seconds.
func (s *Server) Close() error {
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
		return nil
	case <-time.After(readyTimeout):
		return fmt.Errorf("%s: goroutines still running %v after close", s.what, readyTimeout)
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

// UDPConn is a connected UDP socket: every Ask leaves from the same
// source port, as a DNS client's queries do, so a test can see which
// backend the flow's conntrack entry leads to.
type UDPConn struct {
	ns      *NS
	addr    string
	c       net.Conn
	timeout time.Duration
}

// DialUDP opens a UDP socket inside the namespace connected to addr; each
// Ask waits at most timeout for the answer.
func (ns *NS) DialUDP(addr string, timeout time.Duration) (*UDPConn, error) {
	c, err := ns.dial("udp", addr, time.Now().Add(timeout))
	if err != nil {
		return nil, ns.opError("dial udp", addr, err)
	}
	return &UDPConn{ns: ns, addr: addr, c: c, timeout: timeout}, nil
}

// Ask sends one datagram and returns the answer; the errors are AskUDP's.
func (c *UDPConn) Ask() (Reply, error) {
	_ = c.c.SetDeadline(time.Now().Add(c.timeout))
	if _, err := io.WriteString(c.c, "?"); err != nil {
		return Reply{}, c.ns.opError("ask udp", c.addr, err)
	}
	buf := make([]byte, 2048)
	n, err := c.c.Read(buf)
	if err != nil {
		return Reply{}, c.ns.opError("ask udp", c.addr, err)
	}
	r, err := parseReply(string(buf[:n]))
	if err != nil {
		return Reply{}, c.ns.opError("ask udp", c.addr, err)
	}
	return r, nil
}

// LocalAddr is the client's end of the flow.
func (c *UDPConn) LocalAddr() netip.AddrPort { return c.c.LocalAddr().(*net.UDPAddr).AddrPort() }

// Close closes the socket.
func (c *UDPConn) Close() error { return c.c.Close() }

// GetHTTP sends GET url from inside the namespace, on a new connection,
// and returns the status and body; timeout bounds the whole exchange.
func (ns *NS) GetHTTP(url string, timeout time.Duration) (int, string, error) {
	deadline := time.Now().Add(timeout)
	client := &http.Client{
		Timeout: timeout,
		Transport: &http.Transport{
			DisableKeepAlives: true,
			DialContext: func(_ context.Context, network, addr string) (net.Conn, error) {
				return ns.dial(network, addr, deadline)
			},
		},
	}
	resp, err := client.Get(url)
	if err != nil {
		return 0, "", ns.opError("http get", url, err)
	}
	defer func() { _ = resp.Body.Close() }()
	body, err := io.ReadAll(io.LimitReader(resp.Body, 64<<10))
	if err != nil {
		return resp.StatusCode, "", ns.opError("http get", url, err)
	}
	return resp.StatusCode, string(body), nil
}

// AskHTTP is GetHTTP of a ListenHTTP server: it wants a 200 and returns
// the Reply in the body.
func (ns *NS) AskHTTP(url string, timeout time.Duration) (Reply, error) {
	status, body, err := ns.GetHTTP(url, timeout)
	if err != nil {
		return Reply{}, err
	}
	if status != http.StatusOK {
		return Reply{}, ns.opError("http get", url, fmt.Errorf("status %d: %s", status, body))
	}
	r, err := parseReply(body)
	if err != nil {
		return Reply{}, ns.opError("http get", url, err)
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
