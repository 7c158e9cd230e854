package agent

import (
	"net/netip"
	"slices"
	"testing"

	"github.com/nftproxy/nftproxy/dataplane"
	"github.com/nftproxy/nftproxy/internal/conntrack"
)

func TestStaleUDPFlows(t *testing.T) {
	ap := netip.MustParseAddrPort
	port := func(proto dataplane.Protocol, nodePort uint16, eps ...string) dataplane.PortSummary {
		p := dataplane.PortSummary{Family: dataplane.IPv4, Proto: proto, NodePort: nodePort,
			Frontends: []netip.AddrPort{ap("10.96.0.10:53"), ap("203.0.113.7:53")}}
		for _, e := range eps {
			p.Endpoints = append(p.Endpoints, ap(e))
		}
		return p
	}
	rules := func(ports ...dataplane.PortSummary) *dataplane.ServiceRules {
		return &dataplane.ServiceRules{Ports: ports}
	}
	nodePort := ap("0.0.0.0:30053")
	cases := []struct {
		name          string
		before, after *dataplane.ServiceRules
		want          []conntrack.Flow
	}{
		{"unchanged", rules(port(dataplane.UDP, 0, "10.1.0.11:5353")), rules(port(dataplane.UDP, 0, "10.1.0.11:5353")), nil},
		{"endpoint removed", rules(port(dataplane.UDP, 30053, "10.1.0.11:5353", "10.1.0.12:5353")), rules(port(dataplane.UDP, 30053, "10.1.0.12:5353")), []conntrack.Flow{
			{Frontend: ap("10.96.0.10:53"), Endpoint: ap("10.1.0.11:5353")},
			{Frontend: ap("203.0.113.7:53"), Endpoint: ap("10.1.0.11:5353")},
			{Frontend: nodePort, Endpoint: ap("10.1.0.11:5353")},
		}},
		{"endpoint added", rules(port(dataplane.UDP, 0, "10.1.0.11:5353")), rules(port(dataplane.UDP, 0, "10.1.0.11:5353", "10.1.0.12:5353")), nil},
		{"first endpoints", rules(port(dataplane.UDP, 30053)), rules(port(dataplane.UDP, 30053, "10.1.0.11:5353")), []conntrack.Flow{
			{Frontend: ap("10.96.0.10:53")}, {Frontend: ap("203.0.113.7:53")}, {Frontend: nodePort},
		}},
		{"new Service", nil, rules(port(dataplane.UDP, 0, "10.1.0.11:5353")), []conntrack.Flow{
			{Frontend: ap("10.96.0.10:53")}, {Frontend: ap("203.0.113.7:53")},
		}},
		{"Service deleted", rules(port(dataplane.UDP, 0, "10.1.0.11:5353")), nil, []conntrack.Flow{
			{Frontend: ap("10.96.0.10:53"), Endpoint: ap("10.1.0.11:5353")},
			{Frontend: ap("203.0.113.7:53"), Endpoint: ap("10.1.0.11:5353")},
		}},
		{"TCP is left alone", rules(port(dataplane.TCP, 0, "10.1.0.11:5353")), nil, nil},
	}
	for _, c := range cases {
		got := staleUDPFlows(c.before, c.after)
		sortFlows(got)
		sortFlows(c.want)
		if !slices.Equal(got, c.want) {
			t.Errorf("%s: flows %v, want %v", c.name, got, c.want)
		}
	}
}

func sortFlows(flows []conntrack.Flow) {
	slices.SortFunc(flows, func(a, b conntrack.Flow) int {
		if c := a.Frontend.Compare(b.Frontend); c != 0 {
			return c
		}
		return a.Endpoint.Compare(b.Endpoint)
	})
}
