// Package healthcheck serves the healthCheckNodePort of LoadBalancer
// Services with externalTrafficPolicy: Local. Cloud load balancers probe
// http://<node>:<healthCheckNodePort>/ and send traffic only to nodes that
// answer 200, that is nodes with a local endpoint, because such traffic is
// never forwarded to another node.
package healthcheck

import (
	"cmp"
	"encoding/json"
	"errors"
	"fmt"
	"log"
	"maps"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"
)

// Service is what the health check of one Service needs to know.
type Service struct {
	// Port is the Service's spec.healthCheckNodePort.
	Port int32
	// LocalEndpoints counts the Service's ready endpoints on this node.
	LocalEndpoints int
}

// ListenFunc opens a listening socket, as net.Listen does. The agent passes
// one that opens it inside the network namespace it programs.
type ListenFunc func(network, address string) (net.Listener, error)

// Option configures a Server.
type Option func(*config)

type config struct {
	addrs        []netip.Addr
	listen       ListenFunc
	log          logr.Logger
	proxyHealthy func() bool
	timeout      time.Duration // reading the request, writing the answer
	idleTimeout  time.Duration
}

// WithAddresses restricts the health check ports to these node addresses
// (from nodePortAddresses). None, the default, means all addresses.
func WithAddresses(addrs ...netip.Addr) Option {
	return func(c *config) { c.addrs = append(c.addrs, addrs...) }
}

// WithListenFunc replaces net.Listen.
func WithListenFunc(f ListenFunc) Option {
	return func(c *config) {
		if f != nil {
			c.listen = f
		}
	}
}

// WithLogger sets the logger; the default discards.
func WithLogger(l logr.Logger) Option {
	return func(c *config) { c.log = l }
}

// WithProxyHealthy reports whether the proxy itself is healthy, that is
// whether its rules are current. An unhealthy proxy answers 503 on every
// port so load balancers drain the node, as kube-proxy does. The default
// reports healthy.
func WithProxyHealthy(f func() bool) Option {
	return func(c *config) {
		if f != nil {
			c.proxyHealthy = f
		}
	}
}

// Timeouts keep a slow or idle client from holding a connection open for
// good; probes are one small request.
const (
	defaultTimeout     = 5 * time.Second
	defaultIdleTimeout = 60 * time.Second
	maxHeaderBytes     = 16 << 10
)

// Server serves the health check ports of a set of Services. It is safe for
// concurrent use.
type Server struct {
	cfg config

	mu     sync.Mutex // serializes Sync and Close
	ports  map[int32]*port
	closed bool
	wg     sync.WaitGroup // serve goroutines
}

// port is one health check port, listening on every configured address.
type port struct {
	state     atomic.Pointer[portState]
	servers   []*http.Server
	listeners []net.Listener
}

// portState is replaced whole, so a request sees one Service and its count.
type portState struct {
	service   types.NamespacedName
	endpoints int
}

// New returns a Server listening on no port; Sync opens them. It fails when
// an address is invalid.
func New(opts ...Option) (*Server, error) {
	cfg := config{
		listen:       net.Listen,
		log:          logr.Discard(),
		proxyHealthy: func() bool { return true },
		timeout:      defaultTimeout,
		idleTimeout:  defaultIdleTimeout,
	}
	for _, o := range opts {
		o(&cfg)
	}
	for i, a := range cfg.addrs {
		if !a.IsValid() {
			return nil, errors.New("healthcheck: invalid listen address")
		}
		cfg.addrs[i] = a.Unmap() // ::ffff:10.0.0.1 is 10.0.0.1
	}
	// A duplicate address would fail to listen twice on the same port.
	slices.SortFunc(cfg.addrs, netip.Addr.Compare)
	cfg.addrs = slices.Compact(cfg.addrs)
	return &Server{cfg: cfg, ports: map[int32]*port{}}, nil
}

// ErrClosed is returned by Sync after Close.
var ErrClosed = errors.New("healthcheck: server closed")

// PortError is why a Service's health check port is not served. Sync
// retries the port on its next call.
type PortError struct {
	Service types.NamespacedName
	Port    int32
	Err     error
}

func (e *PortError) Error() string {
	return fmt.Sprintf("service %s: health check port %d: %v", e.Service, e.Port, e.Err)
}

func (e *PortError) Unwrap() error { return e.Err }

// Sync makes services the full set served. It opens ports that are new,
// closes ports no longer wanted and updates the others in place, keeping
// their sockets and connections. When ports cannot be opened, or two
// Services ask for the same port (the first by namespace/name keeps it),
// Sync serves all the others and returns the problems joined, one
// *PortError each; a port that failed to open is tried again next time.
func (s *Server) Sync(services map[types.NamespacedName]Service) error {
	start := time.Now()
	want, errs := desired(services)

	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed {
		return ErrClosed
	}

	closed := 0
	for num, p := range s.ports {
		if _, ok := want[num]; !ok {
			s.cfg.log.V(2).Info("Closing health check port", "port", num, "service", p.state.Load().service)
			p.close()
			delete(s.ports, num)
			closed++
		}
	}
	opened := 0
	for _, num := range slices.Sorted(maps.Keys(want)) { // errors in port order
		st := want[num]
		if p, ok := s.ports[num]; ok {
			p.state.Store(st)
			continue
		}
		p, err := s.open(num, st)
		if err != nil {
			errs = append(errs, &PortError{Service: st.service, Port: num, Err: err})
			continue
		}
		s.cfg.log.V(2).Info("Opened health check port", "port", num, "service", st.service)
		s.ports[num] = p
		opened++
	}
	s.cfg.log.V(4).Info("Synced health check ports", "ports", len(s.ports), "opened", opened, "closed", closed,
		"failed", len(errs), "elapsed", time.Since(start))
	return errors.Join(errs...)
}

// desired maps each wanted port to its state, giving a port claimed twice
// to the first Service by namespace/name so the winner does not depend on
// map order.
func desired(services map[types.NamespacedName]Service) (map[int32]*portState, []error) {
	names := make([]types.NamespacedName, 0, len(services))
	for n := range services {
		names = append(names, n)
	}
	slices.SortFunc(names, func(a, b types.NamespacedName) int {
		return cmp.Or(strings.Compare(a.Namespace, b.Namespace), strings.Compare(a.Name, b.Name))
	})
	want := make(map[int32]*portState, len(names))
	var errs []error
	for _, n := range names {
		svc := services[n]
		if svc.Port < 1 || svc.Port > 65535 {
			errs = append(errs, &PortError{Service: n, Port: svc.Port, Err: errors.New("not a valid port")})
			continue
		}
		if st, ok := want[svc.Port]; ok {
			errs = append(errs, &PortError{Service: n, Port: svc.Port,
				Err: fmt.Errorf("port already used by service %s", st.service)})
			continue
		}
		want[svc.Port] = &portState{service: n, endpoints: svc.LocalEndpoints}
	}
	return want, errs
}

// open listens on every address or on none, so a failed port leaves no
// socket behind and the next Sync can try it afresh.
func (s *Server) open(num int32, st *portState) (*port, error) {
	p := &port{}
	p.state.Store(st)
	addrs := []string{":" + strconv.Itoa(int(num))}
	if len(s.cfg.addrs) > 0 {
		addrs = addrs[:0]
		for _, a := range s.cfg.addrs {
			addrs = append(addrs, net.JoinHostPort(a.String(), strconv.Itoa(int(num))))
		}
	}
	for _, addr := range addrs {
		l, err := s.cfg.listen("tcp", addr)
		if err != nil {
			for _, l := range p.listeners {
				_ = l.Close()
			}
			return nil, err
		}
		p.listeners = append(p.listeners, l)
	}
	for _, l := range p.listeners {
		srv := &http.Server{
			Handler:           s.handler(p),
			ReadHeaderTimeout: s.cfg.timeout,
			ReadTimeout:       s.cfg.timeout,
			WriteTimeout:      s.cfg.timeout,
			IdleTimeout:       s.cfg.idleTimeout,
			MaxHeaderBytes:    maxHeaderBytes,
			ErrorLog:          log.New(logWriter{s.cfg.log.WithValues("port", num)}, "", 0),
		}
		p.servers = append(p.servers, srv)
		s.wg.Go(func() {
			if err := srv.Serve(l); !errors.Is(err, http.ErrServerClosed) {
				s.cfg.log.Error(err, "Health check port stopped serving", "address", l.Addr().String())
			}
		})
	}
	return p, nil
}

// close closes the listeners itself as well: Serve may not have started
// yet, and the port must be free when Sync returns.
func (p *port) close() {
	for i, srv := range p.servers {
		_ = srv.Close()
		_ = p.listeners[i].Close()
	}
}

type response struct {
	Service struct {
		Namespace string `json:"namespace"`
		Name      string `json:"name"`
	} `json:"service"`
	LocalEndpoints      int  `json:"localEndpoints"`
	ServiceProxyHealthy bool `json:"serviceProxyHealthy"`
}

func (s *Server) handler(p *port) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		st := p.state.Load()
		var r response
		r.Service.Namespace, r.Service.Name = st.service.Namespace, st.service.Name
		r.LocalEndpoints = st.endpoints
		r.ServiceProxyHealthy = s.cfg.proxyHealthy()
		body, _ := json.Marshal(r) // strings, an int and a bool: cannot fail
		h := w.Header()
		h.Set("Content-Type", "application/json")
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Load-Balancing-Endpoint-Weight", strconv.Itoa(st.endpoints))
		if st.endpoints > 0 && r.ServiceProxyHealthy {
			w.WriteHeader(http.StatusOK)
		} else {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
		_, _ = w.Write(body)
	})
}

// Close stops serving every port and returns once the serve goroutines
// have. Sync fails afterwards. The error, always nil, makes Server an
// io.Closer.
func (s *Server) Close() error {
	s.mu.Lock()
	if !s.closed {
		s.closed = true
		for num, p := range s.ports {
			p.close()
			delete(s.ports, num)
		}
	}
	s.mu.Unlock()
	s.wg.Wait()
	return nil
}

// logWriter sends net/http's own messages (bad requests, accept errors)
// to the logger instead of stderr.
type logWriter struct{ log logr.Logger }

func (w logWriter) Write(b []byte) (int, error) {
	w.log.V(1).Info(strings.TrimSpace(string(b)))
	return len(b), nil
}
