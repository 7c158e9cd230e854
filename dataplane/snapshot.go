package dataplane

import (
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// Snapshot is everything the dataplane is computed from: the cluster as
// this node's agent sees it, and the effective ProxyConfig.
//
// The objects a Snapshot points to are treated as immutable (as the
// objects of an informer cache are): to change a Service or a slice, put a
// new object in a new ServiceState. The Computer relies on this to skip
// Services whose objects are the same as last time.
type Snapshot struct {
	// NodeName is this node's name; endpoints with this nodeName are local.
	NodeName string
	// NodeZone is the node's topology.kubernetes.io/zone label.
	NodeZone string
	// NodeAddresses are the addresses of this node's interfaces; NodePorts
	// are served on those that nodePortAddresses selects.
	NodeAddresses []netip.Addr
	// NodePodCIDRs are this Node's spec.podCIDRs, for
	// localTrafficDetection mode NodeCIDR.
	NodePodCIDRs []netip.Prefix
	// Config is the effective ProxyConfig spec, defaulted.
	Config proxyv1alpha1.ProxyConfigSpec
	// Services maps each Service to its state; Services that nftproxy
	// does not proxy (headless, ExternalName, another proxy's) may be
	// present and are skipped.
	Services map[types.NamespacedName]ServiceState
}

// ServiceState is a Service and the EndpointSlices labelled with its name.
type ServiceState struct {
	Service *corev1.Service
	Slices  []*discoveryv1.EndpointSlice
}
