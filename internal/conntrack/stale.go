package conntrack

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"time"

	"golang.org/x/sys/unix"
)

// Frontend is a UDP frontend (a ClusterIP, external or LoadBalancer IP,
// or a node address with a NodePort) and the endpoints its traffic may be
// DNATed to now.
type Frontend struct {
	Addr      netip.AddrPort
	Endpoints []netip.AddrPort
}

// DeleteStale deletes the UDP entries to any of frontends that are not
// DNATed to one of its endpoints: DNATed to an endpoint that has gone
// since, or not DNATed at all (sent while the frontend had no endpoints).
// That is what a proxy that starts cannot learn from comparing two of its
// own writes. It reads the whole table once, so it is for the first write
// after a start, not for every sync.
func (c *Cleaner) DeleteStale(ctx context.Context, frontends []Frontend) (int, error) {
	if len(frontends) == 0 {
		return 0, nil
	}
	type target struct {
		addr netip.Addr
		port uint16
	}
	valid := make(map[target][]netip.AddrPort, len(frontends))
	for _, f := range frontends {
		a := f.Addr.Addr().Unmap().WithZone("")
		if !a.IsValid() || a.IsUnspecified() || f.Addr.Port() == 0 {
			return 0, fmt.Errorf("conntrack: invalid frontend %s: want an address and port", f.Addr)
		}
		t := target{a, f.Addr.Port()}
		valid[t] = append(valid[t], f.Endpoints...)
	}

	c.mu.Lock()
	defer c.mu.Unlock()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
		defer func() { _ = c.conn.SetDeadline(time.Time{}) }()
	}
	entries, err := c.dumpAll()
	if err != nil {
		return 0, fmt.Errorf("conntrack: listing entries: %w", err)
	}
	var errs []error
	n := 0
	for _, e := range entries {
		if e.proto != unix.IPPROTO_UDP {
			continue
		}
		endpoints, ok := valid[target{e.origDst, e.origDstPort}]
		if !ok || slices.Contains(endpoints, netip.AddrPortFrom(e.replySrc, e.replySrcPort)) {
			continue
		}
		if err := ctx.Err(); err != nil {
			return n, errors.Join(append(errs, err)...)
		}
		deleted, err := c.deleteEntry(e)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		if deleted {
			n++
		}
	}
	return n, errors.Join(errs...)
}
