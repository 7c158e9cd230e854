// Package conntrack deletes stale UDP conntrack entries over netlink, for
// the agent's UDP conntrack cleanup.
//
// UDP has no connection teardown, so the kernel keeps a NATed UDP entry as
// long as the client keeps sending (a DNS resolver reusing its source
// port never stops): when a Service endpoint goes away, its clients keep
// being DNATed to the dead pod until the entry times out. Likewise a
// datagram sent while a Service had no endpoints leaves an un-NATed entry
// that keeps the client's later datagrams from ever being DNATed. The
// agent therefore deletes such entries itself when an endpoint is removed
// or a Service gains endpoints; a Flow says which.
//
// # How deletion is targeted
//
// For each Flow, Delete asks the kernel for a filtered dump (CTA_FILTER,
// Linux 5.10 and later): only UDP entries whose original tuple has the
// Flow's destination (address and port) and, when the Flow names an
// endpoint, whose reply tuple has the endpoint as source. The kernel walks
// its table and sends back just those entries; nothing else crosses the
// socket. Each entry returned is then deleted by its exact original tuple
// together with its conntrack ID, so an entry that was replaced in the
// meantime (the client's next datagram from the same port, freshly NATed
// to a live endpoint) is left alone: the kernel answers ENOENT, which
// Delete treats as "already gone".
//
// Delete never hands a filter to the kernel's delete operation (a
// "filtered flush"): it gives no count, and kernels that predate the
// filter, or that ignore it on deletes, flush whole tables instead. A
// dump is harmless either way, and every entry a dump returns is checked
// against the Flow again before it is deleted. If a kernel ignores the
// filter (older than 5.10: the dump brings back entries that do not
// match) or rejects it, the Cleaner stops asking for filtered dumps and
// from then on dumps the table once per Delete call, not once per Flow,
// matching all Flows in memory.
//
// The ti-mo/conntrack library decodes the entries; it has no API for
// tuple filters or for deleting by ID (its Filter covers mark, status and
// zone, and Conn.Delete does not send CTA_ID), so this package builds
// those two requests itself with ti-mo/netfilter, on one netlink socket.
package conntrack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"sync"
	"time"

	"github.com/mdlayher/netlink"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"
)

// Flow selects the conntrack entries to delete: UDP entries whose original
// destination is Frontend and, when Endpoint's address is valid, whose
// reply source is Endpoint, the pod the entry was DNATed to.
//
// Frontend is a ClusterIP, external IP or load-balancer IP and its port.
// For a NodePort, give only the port (an invalid address, as in
// netip.AddrPortFrom(netip.Addr{}, nodePort)) to match every destination
// address; an unspecified address (0.0.0.0 or ::) does the same within its
// family. Without an address, the family is Endpoint's, or both when there
// is no Endpoint either.
//
// Endpoint is the endpoint that went away: its address, and its port when
// not zero (zero matches any port). Leave it zero when a Service that had
// no endpoints gains some, to delete the UDP entries to Frontend that
// were not DNATed: made while it had no endpoints (or no rules), they
// would keep the client's datagrams away from the endpoints. Entries
// DNATed since, to the new endpoints, are kept.
//
// Addresses may be IPv4-mapped IPv6 addresses; they are taken as IPv4.
type Flow struct {
	Frontend netip.AddrPort
	Endpoint netip.AddrPort
}

// String describes the flow for logs and errors.
func (f Flow) String() string {
	front := "*"
	if a := f.Frontend.Addr(); a.IsValid() {
		front = a.Unmap().String()
	}
	s := fmt.Sprintf("udp dst %s port %d", front, f.Frontend.Port())
	if a := f.Endpoint.Addr(); a.IsValid() {
		s += " to " + a.Unmap().String()
		if p := f.Endpoint.Port(); p != 0 {
			s += fmt.Sprintf(" port %d", p)
		}
	}
	return s
}

// Cleaner deletes conntrack entries in one network namespace. It is safe
// for concurrent use; calls are serialized on its netlink socket.
type Cleaner struct {
	mu   sync.Mutex
	conn *netfilter.Conn
	// noKernelFilter is set once the kernel ignored or rejected a
	// filtered dump; from then on Delete dumps once and filters in memory.
	noKernelFilter bool
}

// Option configures New.
type Option func(*options)

type options struct{ netns string }

// WithNetNS makes the Cleaner work on the conntrack table of the network
// namespace pinned at path (for example /run/netns/NAME) rather than the
// caller's: the agent runs in the host namespace, tests in namespaces they
// create. The namespace is entered only to create the socket, on a locked
// thread of its own (mdlayher/netlink does this for Config.NetNS); the
// socket stays in that namespace for its lifetime.
func WithNetNS(path string) Option {
	return func(o *options) { o.netns = path }
}

// New opens a netlink socket to the kernel's conntrack (ctnetlink). It
// needs CAP_NET_ADMIN in the namespace.
func New(opts ...Option) (*Cleaner, error) {
	var o options
	for _, opt := range opts {
		opt(&o)
	}
	cfg := &netlink.Config{}
	if o.netns != "" {
		f, err := os.Open(o.netns)
		if err != nil {
			return nil, fmt.Errorf("conntrack: open network namespace: %w", err)
		}
		// The socket keeps its namespace once created; the file is
		// needed only until Dial returns.
		defer func() { _ = f.Close() }()
		cfg.NetNS = int(f.Fd())
	}
	conn, err := netfilter.Dial(cfg)
	if err != nil {
		return nil, fmt.Errorf("conntrack: open ctnetlink socket: %w", err)
	}
	// Report only the failing message's header in errors, not the whole
	// request echoed back; deletions are small but dumps need not be.
	if err := conn.SetOption(netlink.CapAcknowledge, true); err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("conntrack: ctnetlink socket: %w", err)
	}
	return &Cleaner{conn: conn}, nil
}

// Close closes the netlink socket.
func (c *Cleaner) Close() error { return c.conn.Close() }

// Delete deletes the UDP conntrack entries matching any of flows and
// returns how many it deleted. It keeps going when a flow or an entry
// fails and returns the failures joined; an entry that disappears before
// Delete gets to it (it expired, or was replaced by a new one with the
// same tuple) is neither counted nor an error. An invalid Flow (no
// Frontend port, or Frontend and Endpoint of different families) is an
// error and deletes nothing. Delete stops, returning ctx's error, when
// ctx is done; ctx's deadline also bounds each netlink exchange.
func (c *Cleaner) Delete(ctx context.Context, flows []Flow) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()

	var errs []error
	var ms []matcher
	seen := make(map[matcher]bool, len(flows))
	for _, f := range flows {
		m, err := newMatcher(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if !seen[m] { // duplicate flows would find nothing the second time
			seen[m] = true
			ms = append(ms, m)
		}
	}
	if len(ms) == 0 {
		return 0, errors.Join(errs...)
	}

	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
		defer func() { _ = c.conn.SetDeadline(time.Time{}) }()
	}

	// deleted remembers what was deleted, by tuple and ID: two flows may
	// select the same entry (an endpoint's flow and its Service's
	// frontend-only flow), and the second delete would only get ENOENT.
	deleted := map[entryKey]bool{}
	n := 0
	del := func(e entry) {
		if deleted[e.key] {
			return
		}
		ok, err := c.deleteEntry(e)
		if err != nil {
			errs = append(errs, err)
			return
		}
		deleted[e.key] = true
		if ok {
			n++
		}
	}

	rest := ms
	if !c.noKernelFilter {
		rest = nil
		for i, m := range ms {
			if err := ctx.Err(); err != nil {
				return n, errors.Join(append(errs, err)...)
			}
			entries, unsupported, err := c.dumpFiltered(m)
			if unsupported {
				// Done with the kernel's filter: match this flow and
				// all the rest against one full dump below.
				c.noKernelFilter = true
				rest = ms[i:]
				break
			}
			if err != nil {
				errs = append(errs, fmt.Errorf("conntrack: listing entries for %s: %w", m.flow, err))
				continue
			}
			for _, e := range entries {
				if err := ctx.Err(); err != nil {
					return n, errors.Join(append(errs, err)...)
				}
				del(e)
			}
		}
	}

	if len(rest) > 0 {
		if err := ctx.Err(); err != nil {
			return n, errors.Join(append(errs, err)...)
		}
		entries, err := c.dumpAll()
		if err != nil {
			errs = append(errs, fmt.Errorf("conntrack: listing entries: %w", err))
			return n, errors.Join(errs...)
		}
		idx := indexByPort(rest)
		for _, e := range entries {
			for _, m := range idx[e.origDstPort] {
				if m.matches(e) {
					if err := ctx.Err(); err != nil {
						return n, errors.Join(append(errs, err)...)
					}
					del(e)
					break
				}
			}
		}
	}
	return n, errors.Join(errs...)
}

// indexByPort groups matchers by Frontend port, so that matching a full
// dump costs one map lookup per entry, not one comparison per flow.
func indexByPort(ms []matcher) map[uint16][]matcher {
	idx := make(map[uint16][]matcher, len(ms))
	for _, m := range ms {
		idx[m.port] = append(idx[m.port], m)
	}
	return idx
}

// isFilterRejected reports whether a filtered dump failed because the
// kernel does not take the filter (an attribute it does not know, or
// CTA_FILTER support left out), rather than for a reason a full dump
// would share.
func isFilterRejected(err error) bool {
	return errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.EINVAL)
}
