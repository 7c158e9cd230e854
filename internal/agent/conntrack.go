package agent

import (
	"context"
	"net/netip"
	"slices"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/utils/ptr"

	"github.com/nftproxy/nftproxy/dataplane"
	"github.com/nftproxy/nftproxy/internal/conntrack"
)

// conntrackTimeout bounds one cleanup, which runs in the sync loop.
const conntrackTimeout = 10 * time.Second

// FlowDeleter deletes conntrack entries; conntrack.Cleaner is the real one.
type FlowDeleter interface {
	Delete(ctx context.Context, flows []conntrack.Flow) (int, error)
	DeleteStale(ctx context.Context, frontends []conntrack.Frontend) (int, error)
}

// conntrackCleanup deletes the UDP conntrack entries a write made stale
// (udpConntrackCleanup): entries DNATed to an endpoint that is gone, which
// would keep a client's datagrams flowing to it, and un-NATed entries to a
// frontend that had no endpoints and now has some, which would keep the
// client from ever reaching them. Only the Services the write changed are
// looked at, and only their flows are asked of the kernel.
type conntrackCleanup struct {
	deleter FlowDeleter
	log     logr.Logger
	metrics *Metrics
}

func (c *conntrackCleanup) afterSync(ctx context.Context, r SyncResult) {
	if !ptr.Deref(r.Snapshot.Config.UDPConntrackCleanup, true) {
		return
	}
	ctx, cancel := context.WithTimeout(ctx, conntrackTimeout)
	defer cancel()
	// The first write after a start has nothing to compare with: what
	// changed while no agent ran is not known, so every UDP entry to a
	// frontend is checked against the endpoints it has now, once.
	if r.Previous == nil {
		n, err := c.deleter.DeleteStale(ctx, udpFrontendsNow(r.Ruleset, r.Snapshot.NodeAddresses))
		c.metrics.observeConntrack(n, err)
		if err != nil {
			c.log.Error(err, "UDP conntrack cleanup at start failed in part", "deleted", n)
			return
		}
		c.log.V(1).Info("UDP conntrack cleanup at start", "deleted", n)
		return
	}
	keys := r.Changed
	if r.All {
		keys = unionKeys(r.Previous, r.Ruleset)
	}
	var flows []conntrack.Flow
	for _, key := range keys {
		flows = append(flows, staleUDPFlows(r.Previous.Services[key], r.Ruleset.Services[key])...)
	}
	if len(flows) == 0 {
		return
	}
	n, err := c.deleter.Delete(ctx, flows)
	c.metrics.observeConntrack(n, err)
	if err != nil {
		c.log.Error(err, "UDP conntrack cleanup failed in part", "flows", len(flows), "deleted", n)
		return
	}
	c.log.V(1).Info("UDP conntrack cleanup", "flows", len(flows), "deleted", n)
}

func unionKeys(a, b *dataplane.Ruleset) []types.NamespacedName {
	var keys []types.NamespacedName
	for key := range a.Services {
		keys = append(keys, key)
	}
	for key := range b.Services {
		if _, ok := a.Services[key]; !ok {
			keys = append(keys, key)
		}
	}
	return keys
}

// frontend is where a client sends a Service's traffic: an address and
// port, or (address invalid) a NodePort of a family.
type frontend struct {
	family dataplane.Family
	addr   netip.AddrPort
}

// staleUDPFlows compares one Service's UDP ports before and after a write
// (either may be nil): each endpoint a frontend lost, and each frontend
// that went from no endpoints to some, is a flow to delete.
func staleUDPFlows(before, after *dataplane.ServiceRules) []conntrack.Flow {
	old, cur := udpFrontends(before), udpFrontends(after)
	var flows []conntrack.Flow
	for fe, endpoints := range old {
		kept := cur[fe]
		for _, ep := range endpoints {
			if !slices.Contains(kept, ep) {
				flows = append(flows, conntrack.Flow{Frontend: fe.flowAddr(), Endpoint: ep})
			}
		}
	}
	for fe, endpoints := range cur {
		if len(endpoints) > 0 && len(old[fe]) == 0 {
			flows = append(flows, conntrack.Flow{Frontend: fe.flowAddr()})
		}
	}
	return flows
}

func udpFrontends(rules *dataplane.ServiceRules) map[frontend][]netip.AddrPort {
	out := map[frontend][]netip.AddrPort{}
	if rules == nil {
		return out
	}
	for _, p := range rules.Ports {
		if p.Proto != dataplane.UDP {
			continue
		}
		for _, fe := range p.Frontends {
			out[frontend{p.Family, fe}] = p.Endpoints
		}
		if p.NodePort != 0 {
			out[frontend{p.Family, netip.AddrPortFrom(netip.Addr{}, p.NodePort)}] = p.Endpoints
		}
	}
	return out
}

// flowAddr is the frontend as conntrack.Flow takes it: a NodePort as the
// unspecified address of its family, which matches every destination.
func (fe frontend) flowAddr() netip.AddrPort {
	if fe.addr.Addr().IsValid() {
		return fe.addr
	}
	unspecified := netip.IPv4Unspecified()
	if fe.family == dataplane.IPv6 {
		unspecified = netip.IPv6Unspecified()
	}
	return netip.AddrPortFrom(unspecified, fe.addr.Port())
}

// udpFrontendsNow lists every UDP frontend with endpoints in rs, NodePorts
// on each of the node's addresses of their family.
func udpFrontendsNow(rs *dataplane.Ruleset, nodeAddresses []netip.Addr) []conntrack.Frontend {
	var out []conntrack.Frontend
	for _, rules := range rs.Services {
		for _, p := range rules.Ports {
			if p.Proto != dataplane.UDP || len(p.Endpoints) == 0 {
				continue
			}
			for _, fe := range p.Frontends {
				out = append(out, conntrack.Frontend{Addr: fe, Endpoints: p.Endpoints})
			}
			if p.NodePort == 0 {
				continue
			}
			for _, a := range nodeAddresses {
				if (a.Is4() && p.Family == dataplane.IPv4) || (a.Is6() && !a.Is4In6() && p.Family == dataplane.IPv6) {
					out = append(out, conntrack.Frontend{Addr: netip.AddrPortFrom(a, p.NodePort), Endpoints: p.Endpoints})
				}
			}
		}
	}
	return out
}
