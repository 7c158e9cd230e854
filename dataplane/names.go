package dataplane

import (
	"fmt"
	"hash/fnv"

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
	setEndpoints           = "endpoints"
	setHairpin             = "hairpin"
	setAffinity            = "affinity"
	setAffinityFrontends   = "affinity-frontends"
	setAffinityNodePorts   = "affinity-nodeports"
	setFirewallIPs         = "firewall-ips"
	setFirewallAllow       = "firewall-allow"

	chainNATPrerouting          = "nat-prerouting"
	chainNATOutput              = "nat-output"
	chainNATPostrouting         = "nat-postrouting"
	chainFilterPrerouting       = "filter-prerouting"
	chainFilterInput            = "filter-input"
	chainFilterForward          = "filter-forward"
	chainFilterOutput           = "filter-output"
	chainFilterOutputPostDNAT   = "filter-output-post-dnat"
	chainServices               = "services"
	chainServiceEndpointsCheck  = "service-endpoints-check"
	chainNodePortEndpointsCheck = "nodeport-endpoints-check"
	chainClusterIPsCheck        = "cluster-ips-check"
	chainFirewallCheck          = "firewall-check"
	chainMasquerading           = "masquerading"
	chainRejectPacket           = "reject-packet"
	chainAffinityRecord         = "affinity-record"
)

func familySet(name string, f Family) string { return name + f.Suffix() }

// endpointMapShards is how many endpoint maps each family has. The kernel
// checks every rule that uses a map each time an element is added to it,
// so one map for all Services would make each endpoint written cost time
// in proportion to the number of Services; with 64 maps, a Service port's
// rule is one of ~800 users of its map at 50,000 Services.
const endpointMapShards = 64

// endpointMapName is the endpoint map a service chain's indexes live in,
// chosen by a hash of the chain's name so it is stable for the chain's life.
func endpointMapName(f Family, chain string) string {
	h := fnv.New32a()
	h.Write([]byte(chain))
	return endpointShardName(f, h.Sum32()%endpointMapShards)
}

// affinityMapShards is how many affinity maps each family has. The
// control plane never adds elements to them, but adding a rule that
// looks a map up makes the kernel walk every other rule bound to that
// map: with one map per family, the lookup rules of 16,667 affinity
// Services (50,000 in the policy mix) took a cold start from 13-14 s to
// 20 s. The Service port picks its shard.
const affinityMapShards = 16

// affinityMapName is the affinity map of a Service port in a family,
// chosen by a hash of its id: all its chains (cluster and local) use the
// one map its frontends record in.
func affinityMapName(f Family, portID string) string {
	h := fnv.New32a()
	h.Write([]byte(portID))
	return affinityShardName(f, h.Sum32()%affinityMapShards)
}

// affinityUpdateChainName is the shared chain that records new
// connections in an affinity map with a timeout:
// "update-affinity4-0c-10800s".
func affinityUpdateChainName(set string, timeout uint32) string {
	return fmt.Sprintf("update-%s-%ds", set, timeout)
}

func affinityShardName(f Family, shard uint32) string {
	return fmt.Sprintf("%s%s-%02x", setAffinity, f.Suffix(), shard)
}

func endpointShardName(f Family, shard uint32) string {
	return fmt.Sprintf("%s%s-%02x", setEndpoints, f.Suffix(), shard)
}

// servicePortID is the readable part of the chains of one Service port:
// "namespace/name/tcp/80". Service ports are unique by (protocol, port).
func servicePortID(svc types.NamespacedName, proto Protocol, port int32) string {
	return fmt.Sprintf("%s/%s/%s/%d", svc.Namespace, svc.Name, proto, port)
}

// serviceChainName is the chain that picks an endpoint for a Service port.
func serviceChainName(f Family, portID string) string { return "svc" + f.Suffix() + "-" + portID }

// localChainName is the chain that picks one of the port's endpoints on
// this node, for Local traffic policies.
func localChainName(f Family, portID string) string { return "local" + f.Suffix() + "-" + portID }

// internalChainName is the chain ClusterIP traffic of a port with
// internalTrafficPolicy Local goes through (masquerade what comes from
// outside the cluster) before the local chain.
func internalChainName(f Family, portID string) string { return "int" + f.Suffix() + "-" + portID }

// externalChainName is the chain external frontends (NodePort, externalIPs,
// LoadBalancer IPs) of a Service port go through before the service chain.
func externalChainName(f Family, portID string) string { return "ext" + f.Suffix() + "-" + portID }

// frontendComment labels elements of a Service port: "namespace/name:port",
// with the port's name when it has one.
func frontendComment(svc types.NamespacedName, portName string, port int32) string {
	if portName == "" {
		return fmt.Sprintf("%s/%s:%d", svc.Namespace, svc.Name, port)
	}
	return fmt.Sprintf("%s/%s:%s", svc.Namespace, svc.Name, portName)
}
