package healthcheck_test

import (
	"bufio"
	"encoding/json"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/internal/healthcheck"
)

var loopback = netip.MustParseAddr("127.0.0.1")

func nn(ns, name string) types.NamespacedName {
	return types.NamespacedName{Namespace: ns, Name: name}
}

// freePort returns a port nothing listens on right now, found by letting
// the kernel pick one.
func freePort(t *testing.T) int32 {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return int32(l.Addr().(*net.TCPAddr).Port)
}

func addr(ip string, port int32) string {
	return net.JoinHostPort(ip, strconv.Itoa(int(port)))
}

// recorder is a ListenFunc that counts and records its calls and wraps the
// listeners to see when their Accept gives up.
type recorder struct {
	mu        sync.Mutex
	addresses []string
	listeners []*watchedListener
	// rewrite, when set, maps the address asked for to the one opened.
	rewrite func(string) string
}

type watchedListener struct {
	net.Listener
	acceptDone atomic.Bool
}

// Accept takes a while to give up, so that a Close that does not wait for
// the serve loops returns before acceptDone is set.
func (l *watchedListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		time.Sleep(50 * time.Millisecond)
		l.acceptDone.Store(true)
	}
	return c, err
}

func (r *recorder) listen(network, address string) (net.Listener, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.addresses = append(r.addresses, address)
	if r.rewrite != nil {
		address = r.rewrite(address)
	}
	l, err := net.Listen(network, address)
	if err != nil {
		return nil, err
	}
	w := &watchedListener{Listener: l}
	r.listeners = append(r.listeners, w)
	return w, nil
}

func (r *recorder) calls() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return len(r.addresses)
}

func newServer(t *testing.T, opts ...healthcheck.Option) *healthcheck.Server {
	t.Helper()
	s, err := healthcheck.New(append([]healthcheck.Option{healthcheck.WithAddresses(loopback)}, opts...)...)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = s.Close() })
	return s
}

func mustSync(t *testing.T, s *healthcheck.Server, services map[types.NamespacedName]healthcheck.Service) {
	t.Helper()
	if err := s.Sync(services); err != nil {
		t.Fatalf("Sync: %v", err)
	}
}

type answer struct {
	status int
	header http.Header
	body   string
	reused bool
}

type body struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

func get(t *testing.T, c *http.Client, address, path string) answer {
	t.Helper()
	a, err := tryGet(c, address, path)
	if err != nil {
		t.Fatalf("GET %s%s: %v", address, path, err)
	}
	return a
}

func tryGet(c *http.Client, address, path string) (answer, error) {
	var a answer
	trace := &httptrace.ClientTrace{GotConn: func(i httptrace.GotConnInfo) { a.reused = i.Reused }}
	req, err := http.NewRequest(http.MethodGet, "http://"+address+path, nil)
	if err != nil {
		return a, err
	}
	req = req.WithContext(httptrace.WithClientTrace(req.Context(), trace))
	resp, err := c.Do(req)
	if err != nil {
		return a, err
	}
	defer func() { _ = resp.Body.Close() }()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return a, err
	}
	a.status, a.header, a.body = resp.StatusCode, resp.Header, string(b)
	return a, nil
}

func decode(t *testing.T, a answer) body {
	t.Helper()
	var b body
	if err := json.Unmarshal([]byte(a.body), &b); err != nil {
		t.Fatalf("body %q: %v", a.body, err)
	}
	return b
}

func client(t *testing.T) *http.Client {
	t.Helper()
	tr := &http.Transport{}
	t.Cleanup(tr.CloseIdleConnections)
	return &http.Client{Transport: tr, Timeout: 5 * time.Second}
}

// refused fails the test unless nothing listens on address.
func refused(t *testing.T, address string) {
	t.Helper()
	c, err := net.DialTimeout("tcp", address, 2*time.Second)
	if err == nil {
		_ = c.Close()
		t.Fatalf("%s still accepts connections", address)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		t.Fatalf("dial %s: %v, want connection refused", address, err)
	}
}

// portErrors unpacks Sync's joined error.
func portErrors(t *testing.T, err error) []*healthcheck.PortError {
	t.Helper()
	if err == nil {
		return nil
	}
	joined, ok := err.(interface{ Unwrap() []error })
	if !ok {
		t.Fatalf("Sync error %v is not joined", err)
	}
	var out []*healthcheck.PortError
	for _, e := range joined.Unwrap() {
		var pe *healthcheck.PortError
		if !errors.As(e, &pe) {
			t.Fatalf("Sync error %v is not a *PortError", e)
		}
		out = append(out, pe)
	}
	return out
}

func TestServesCountWithHeadersAndBody(t *testing.T) {
	s := newServer(t)
	p := freePort(t)
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 3}})

	for _, path := range []string{"/", "/healthz", "/any/path?x=1"} {
		a := get(t, client(t), addr("127.0.0.1", p), path)
		if a.status != http.StatusOK {
			t.Errorf("%s: status %d, want 200", path, a.status)
		}
		for h, want := range map[string]string{
			"Content-Type":                     "application/json",
			"X-Content-Type-Options":           "nosniff",
			"X-Load-Balancing-Endpoint-Weight": "3",
		} {
			if got := a.header.Get(h); got != want {
				t.Errorf("%s: header %s = %q, want %q", path, h, got, want)
			}
		}
		want := `{"service":{"namespace":"shop","name":"web"},"localEndpoints":3,"serviceProxyHealthy":true}`
		if a.body != want {
			t.Errorf("%s: body\n%s\nwant\n%s", path, a.body, want)
		}
	}
}

func TestNoLocalEndpointsIsUnavailable(t *testing.T) {
	s := newServer(t)
	p := freePort(t)
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p}})

	a := get(t, client(t), addr("127.0.0.1", p), "/")
	if a.status != http.StatusServiceUnavailable {
		t.Errorf("status %d, want 503", a.status)
	}
	if got := a.header.Get("X-Load-Balancing-Endpoint-Weight"); got != "0" {
		t.Errorf("weight %q, want 0", got)
	}
	if b := decode(t, a); b.LocalEndpoints != 0 || b.Service.Name != "web" || !b.ServiceProxyHealthy {
		t.Errorf("body %+v", b)
	}
}

// An unhealthy proxy has stale rules, so kube-proxy fails every health
// check to make load balancers drain the node.
func TestUnhealthyProxyIsUnavailable(t *testing.T) {
	var healthy atomic.Bool
	s := newServer(t, healthcheck.WithProxyHealthy(healthy.Load))
	p := freePort(t)
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 2}})
	c := client(t)

	a := get(t, c, addr("127.0.0.1", p), "/")
	if b := decode(t, a); a.status != http.StatusServiceUnavailable || b.ServiceProxyHealthy || b.LocalEndpoints != 2 {
		t.Errorf("unhealthy proxy: status %d body %+v, want 503, unhealthy, 2 endpoints", a.status, b)
	}
	healthy.Store(true)
	a = get(t, c, addr("127.0.0.1", p), "/")
	if b := decode(t, a); a.status != http.StatusOK || !b.ServiceProxyHealthy {
		t.Errorf("healthy proxy: status %d body %+v, want 200, healthy", a.status, b)
	}
}

func TestUpdateKeepsSocketAndConnection(t *testing.T) {
	rec := &recorder{}
	s := newServer(t, healthcheck.WithListenFunc(rec.listen))
	p := freePort(t)
	c := client(t)
	at := addr("127.0.0.1", p)

	steps := []struct {
		services   map[types.NamespacedName]healthcheck.Service
		wantStatus int
		wantBody   string
	}{
		{map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 2}}, 200,
			`{"service":{"namespace":"shop","name":"web"},"localEndpoints":2,"serviceProxyHealthy":true}`},
		{map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 0}}, 503,
			`{"service":{"namespace":"shop","name":"web"},"localEndpoints":0,"serviceProxyHealthy":true}`},
		{map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 5}}, 200,
			`{"service":{"namespace":"shop","name":"web"},"localEndpoints":5,"serviceProxyHealthy":true}`},
		// The port passes to another Service: still the same socket.
		{map[types.NamespacedName]healthcheck.Service{nn("shop", "api"): {Port: p, LocalEndpoints: 1}}, 200,
			`{"service":{"namespace":"shop","name":"api"},"localEndpoints":1,"serviceProxyHealthy":true}`},
	}
	for i, st := range steps {
		mustSync(t, s, st.services)
		a := get(t, c, at, "/")
		if a.status != st.wantStatus || a.body != st.wantBody {
			t.Errorf("step %d: got %d %s, want %d %s", i, a.status, a.body, st.wantStatus, st.wantBody)
		}
		if i > 0 && !a.reused {
			t.Errorf("step %d: keep-alive connection was not reused", i)
		}
	}
	if n := rec.calls(); n != 1 {
		t.Errorf("listen called %d times, want 1", n)
	}
}

func TestRemovedPortIsClosed(t *testing.T) {
	s := newServer(t)
	p1, p2 := freePort(t), freePort(t)
	c := client(t)
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{
		nn("shop", "web"): {Port: p1, LocalEndpoints: 1},
		nn("shop", "api"): {Port: p2, LocalEndpoints: 1},
	})
	get(t, c, addr("127.0.0.1", p2), "/") // leaves a keep-alive connection

	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p1, LocalEndpoints: 1}})
	refused(t, addr("127.0.0.1", p2))
	if _, err := tryGet(c, addr("127.0.0.1", p2), "/"); err == nil {
		t.Error("request to removed port succeeded over the old keep-alive connection")
	}
	if a := get(t, c, addr("127.0.0.1", p1), "/"); a.status != http.StatusOK {
		t.Errorf("remaining port: status %d", a.status)
	}

	mustSync(t, s, nil)
	refused(t, addr("127.0.0.1", p1))
}

func TestPortChange(t *testing.T) {
	rec := &recorder{}
	s := newServer(t, healthcheck.WithListenFunc(rec.listen))
	p1, p2, p3 := freePort(t), freePort(t), freePort(t)
	c := client(t)
	web, api := nn("shop", "web"), nn("shop", "api")

	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{web: {Port: p1, LocalEndpoints: 1}})
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{web: {Port: p2, LocalEndpoints: 1}})
	refused(t, addr("127.0.0.1", p1))
	if b := decode(t, get(t, c, addr("127.0.0.1", p2), "/")); b.Service.Name != "web" {
		t.Errorf("new port serves %+v", b)
	}

	// Two Services swap ports: both ports stay wanted, so no socket moves.
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{web: {Port: p2, LocalEndpoints: 1}, api: {Port: p3, LocalEndpoints: 2}})
	before := rec.calls()
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{web: {Port: p3, LocalEndpoints: 1}, api: {Port: p2, LocalEndpoints: 2}})
	if n := rec.calls(); n != before {
		t.Errorf("swap opened %d sockets, want 0", n-before)
	}
	if b := decode(t, get(t, c, addr("127.0.0.1", p3), "/")); b.Service.Name != "web" || b.LocalEndpoints != 1 {
		t.Errorf("port %d serves %+v, want web with 1", p3, b)
	}
	if b := decode(t, get(t, c, addr("127.0.0.1", p2), "/")); b.Service.Name != "api" || b.LocalEndpoints != 2 {
		t.Errorf("port %d serves %+v, want api with 2", p2, b)
	}
}

func TestConflictingPortFirstServiceWins(t *testing.T) {
	s := newServer(t)
	shared, other := freePort(t), freePort(t)
	c := client(t)
	// Namespace decides before name: a/z comes before a-b/a, though the
	// string "a-b/a" sorts before "a/z".
	err := s.Sync(map[types.NamespacedName]healthcheck.Service{
		nn("a-b", "a"): {Port: shared, LocalEndpoints: 7},
		nn("a", "z"):   {Port: shared, LocalEndpoints: 1},
		nn("c", "c"):   {Port: other, LocalEndpoints: 1},
	})
	pes := portErrors(t, err)
	if len(pes) != 1 || pes[0].Service != nn("a-b", "a") || pes[0].Port != shared ||
		!strings.Contains(pes[0].Error(), "a/z") || !strings.Contains(pes[0].Error(), strconv.Itoa(int(shared))) {
		t.Fatalf("Sync error %v, want one naming a-b/a, port %d and the winner a/z", err, shared)
	}
	if b := decode(t, get(t, c, addr("127.0.0.1", shared), "/")); b.Service != (struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	}{"a", "z"}) || b.LocalEndpoints != 1 {
		t.Errorf("shared port serves %+v, want a/z", b)
	}
	if a := get(t, c, addr("127.0.0.1", other), "/"); a.status != http.StatusOK {
		t.Errorf("other port: status %d", a.status)
	}
}

func TestPortInUseIsRetried(t *testing.T) {
	s := newServer(t)
	busy, free := freePort(t), freePort(t)
	c := client(t)
	blocker, err := net.Listen("tcp", addr("127.0.0.1", busy))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = blocker.Close() }()
	services := map[types.NamespacedName]healthcheck.Service{
		nn("shop", "web"): {Port: busy, LocalEndpoints: 1},
		nn("shop", "api"): {Port: free, LocalEndpoints: 1},
	}

	err = s.Sync(services)
	pes := portErrors(t, err)
	if len(pes) != 1 || pes[0].Service != nn("shop", "web") || pes[0].Port != busy || !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("Sync error %v, want address in use for shop/web port %d", err, busy)
	}
	if a := get(t, c, addr("127.0.0.1", free), "/"); a.status != http.StatusOK {
		t.Errorf("free port: status %d", a.status)
	}
	// Still failing while blocked, and the free port is not reopened.
	if err := s.Sync(services); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("second Sync: %v, want address in use", err)
	}

	if err := blocker.Close(); err != nil {
		t.Fatal(err)
	}
	mustSync(t, s, services)
	if b := decode(t, get(t, c, addr("127.0.0.1", busy), "/")); b.Service.Name != "web" {
		t.Errorf("retried port serves %+v", b)
	}
}

// A port is opened on every address or on none: a half-open port would
// answer on some node addresses and never be retried.
func TestPortOpensOnAllAddressesOrNone(t *testing.T) {
	second := netip.MustParseAddr("127.0.0.2")
	s := newServer(t, healthcheck.WithAddresses(second, loopback)) // loopback twice: deduplicated
	p := freePort(t)
	c := client(t)
	blocker, err := net.Listen("tcp", addr("127.0.0.2", p))
	if err != nil {
		t.Skipf("cannot listen on 127.0.0.2: %v", err)
	}
	defer func() { _ = blocker.Close() }()
	services := map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 1}}

	if err := s.Sync(services); !errors.Is(err, syscall.EADDRINUSE) {
		t.Fatalf("Sync: %v, want address in use", err)
	}
	refused(t, addr("127.0.0.1", p))

	if err := blocker.Close(); err != nil {
		t.Fatal(err)
	}
	mustSync(t, s, services)
	for _, ip := range []string{"127.0.0.1", "127.0.0.2"} {
		if a := get(t, c, addr(ip, p), "/"); a.status != http.StatusOK {
			t.Errorf("%s: status %d", ip, a.status)
		}
	}
}

func TestListenAddresses(t *testing.T) {
	p := freePort(t)
	for _, tc := range []struct {
		name  string
		addrs []netip.Addr
		want  []string
	}{
		{"all addresses by default", nil, []string{":" + strconv.Itoa(int(p))}},
		{"node port addresses", []netip.Addr{netip.MustParseAddr("::ffff:127.0.0.1"), netip.MustParseAddr("::1")},
			[]string{addr("127.0.0.1", p), addr("::1", p)}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			// Open something harmless instead: the test checks what is asked for.
			rec := &recorder{rewrite: func(string) string { return "127.0.0.1:0" }}
			s, err := healthcheck.New(healthcheck.WithAddresses(tc.addrs...), healthcheck.WithListenFunc(rec.listen))
			if err != nil {
				t.Fatal(err)
			}
			defer func() { _ = s.Close() }()
			mustSync(t, s, map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p}})
			if diff := cmp.Diff(tc.want, rec.addresses); diff != "" {
				t.Errorf("listen addresses (-want +got):\n%s", diff)
			}
		})
	}
}

func TestInvalidAddressAndPort(t *testing.T) {
	if _, err := healthcheck.New(healthcheck.WithAddresses(netip.Addr{})); err == nil {
		t.Error("New accepted the zero netip.Addr")
	}

	s := newServer(t)
	p := freePort(t)
	err := s.Sync(map[types.NamespacedName]healthcheck.Service{
		nn("shop", "zero"): {Port: 0},
		nn("shop", "big"):  {Port: 70000},
		nn("shop", "web"):  {Port: p, LocalEndpoints: 1},
	})
	var got []types.NamespacedName
	for _, pe := range portErrors(t, err) {
		got = append(got, pe.Service)
	}
	if diff := cmp.Diff([]types.NamespacedName{nn("shop", "big"), nn("shop", "zero")}, got); diff != "" {
		t.Errorf("services in error (-want +got):\n%s", diff)
	}
	if a := get(t, client(t), addr("127.0.0.1", p), "/"); a.status != http.StatusOK {
		t.Errorf("valid port: status %d", a.status)
	}
}

func TestCloseStopsEverything(t *testing.T) {
	rec := &recorder{}
	s := newServer(t, healthcheck.WithListenFunc(rec.listen))
	p1, p2 := freePort(t), freePort(t)
	c := client(t)
	services := map[types.NamespacedName]healthcheck.Service{
		nn("shop", "web"): {Port: p1, LocalEndpoints: 1},
		nn("shop", "api"): {Port: p2, LocalEndpoints: 1},
	}
	mustSync(t, s, services)
	get(t, c, addr("127.0.0.1", p1), "/") // leaves a keep-alive connection

	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	// Close waited for the serve loops, which end when Accept fails.
	for _, l := range rec.listeners {
		if !l.acceptDone.Load() {
			t.Errorf("%s: serve loop still running after Close", l.Addr())
		}
	}
	refused(t, addr("127.0.0.1", p1))
	refused(t, addr("127.0.0.1", p2))
	if _, err := tryGet(c, addr("127.0.0.1", p1), "/"); err == nil {
		t.Error("request succeeded over a keep-alive connection after Close")
	}
	if err := s.Sync(services); !errors.Is(err, healthcheck.ErrClosed) {
		t.Errorf("Sync after Close: %v, want ErrClosed", err)
	}
	if err := s.Close(); err != nil {
		t.Errorf("second Close: %v", err)
	}
}

func TestSlowClientIsCutOff(t *testing.T) {
	s := newServer(t, healthcheck.WithTimeoutForTest(200*time.Millisecond))
	p := freePort(t)
	mustSync(t, s, map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: 1}})

	conn, err := net.Dial("tcp", addr("127.0.0.1", p))
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	// Headers that never end.
	if _, err := io.WriteString(conn, "GET / HTTP/1.1\r\nHost: x\r\n"); err != nil {
		t.Fatal(err)
	}
	if err := conn.SetReadDeadline(time.Now().Add(3 * time.Second)); err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	_, err = bufio.NewReader(conn).ReadString('\n')
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Fatalf("connection still open after %v", time.Since(start))
	}
	if err == nil {
		t.Fatal("server answered headers that never ended")
	}
}

// Requests racing Syncs see a Service and its count together: 200 exactly
// when the body reports local endpoints. Run with -race.
func TestConcurrentSyncAndServe(t *testing.T) {
	s := newServer(t)
	p := freePort(t)
	svc := func(i int) map[types.NamespacedName]healthcheck.Service {
		return map[types.NamespacedName]healthcheck.Service{nn("shop", "web"): {Port: p, LocalEndpoints: i % 3}}
	}
	mustSync(t, s, svc(1))

	done := make(chan struct{})
	var requests atomic.Int64
	var wg sync.WaitGroup
	for range 4 {
		wg.Go(func() {
			c := &http.Client{Transport: &http.Transport{}, Timeout: 5 * time.Second}
			defer c.CloseIdleConnections()
			for {
				select {
				case <-done:
					return
				default:
				}
				a, err := tryGet(c, addr("127.0.0.1", p), "/")
				if err != nil {
					t.Error(err)
					return
				}
				requests.Add(1)
				var b body
				if err := json.Unmarshal([]byte(a.body), &b); err != nil {
					t.Error(err)
					return
				}
				if (a.status == http.StatusOK) != (b.LocalEndpoints > 0) ||
					a.header.Get("X-Load-Balancing-Endpoint-Weight") != strconv.Itoa(b.LocalEndpoints) {
					t.Errorf("status %d, weight %s, body %s disagree", a.status, a.header.Get("X-Load-Balancing-Endpoint-Weight"), a.body)
					return
				}
			}
		})
	}
	for i := 0; requests.Load() < 500 && !t.Failed(); i++ {
		mustSync(t, s, svc(i))
	}
	close(done)
	wg.Wait()
}
