package dataplane

import (
	"fmt"
	"net/netip"
	"strings"

	"k8s.io/apimachinery/pkg/types"
)

// Names of the table's fixed sets, maps and chains. Per-family ones get the
// family suffix ("service-ips4", "service-ips6").
const (
	setServiceIPs          = "service-ips"
	setServiceNodePorts    = "service-nodeports"
	setNodePortIPs         = "nodeport-ips"
	setNoEndpointServices  = "no-endpoint-services"
	setNoEndpointNodePorts = "no-endpoint-nodeports"
	setClusterIPs          = "cluster-ips"

	chainNATPrerouting          = "nat-prerouting"
	chainNATOutput              = "nat-output"
	chainNATPostrouting         = "nat-postrouting"
	chainFilterInput            = "filter-input"
	chainFilterForward          = "filter-forward"
	chainFilterOutput           = "filter-output"
	chainFilterOutputPostDNAT   = "filter-output-post-dnat"
	chainServices               = "services"
	chainServiceEndpointsCheck  = "service-endpoints-check"
	chainNodePortEndpointsCheck = "nodeport-endpoints-check"
	chainClusterIPsCheck        = "cluster-ips-check"
	chainMarkForMasquerade      = "mark-for-masquerade"
	chainMasquerading           = "masquerading"
	chainRejectPacket           = "reject-packet"
)

func familySet(name string, f Family) string { return name + f.Suffix() }

// servicePortID is the readable part of the chains of one Service port:
// "namespace/name/tcp/80". Service ports are unique by (protocol, port).
func servicePortID(svc types.NamespacedName, proto Protocol, port int32) string {
	return fmt.Sprintf("%s/%s/%s/%d", svc.Namespace, svc.Name, proto, port)
}

// serviceChainName is the chain that picks an endpoint for a Service port.
func serviceChainName(f Family, portID string) string { return "svc" + f.Suffix() + "-" + portID }

// externalChainName is the chain external frontends (NodePort, externalIPs,
// LoadBalancer IPs) of a Service port go through before the service chain.
func externalChainName(f Family, portID string) string { return "ext" + f.Suffix() + "-" + portID }

// endpointChainName is the chain that DNATs to one endpoint of a Service
// port. IPv6 colons become dots so the name needs no quoting in nft.
func endpointChainName(f Family, portID string, ep netip.AddrPort) string {
	addr := strings.ReplaceAll(ep.Addr().String(), ":", ".")
	return fmt.Sprintf("ep%s-%s__%s/%d", f.Suffix(), portID, addr, ep.Port())
}

// frontendComment labels elements of a Service port: "namespace/name:port",
// with the port's name when it has one.
func frontendComment(svc types.NamespacedName, portName string, port int32) string {
	if portName == "" {
		return fmt.Sprintf("%s/%s:%d", svc.Namespace, svc.Name, port)
	}
	return fmt.Sprintf("%s/%s:%s", svc.Namespace, svc.Name, portName)
}
