package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// CIDR is an IP prefix in CIDR notation, IPv4 or IPv6, written with its
// network address (no bits set after the prefix length), so that a typo such
// as 10.0.0.1/8 is caught instead of silently widening a rule.
//
// +kubebuilder:validation:MinLength=9
// +kubebuilder:validation:MaxLength=43
// +kubebuilder:validation:XValidation:rule="isCIDR(self)",message="must be a CIDR such as 10.244.0.0/16 or fd00:10:244::/56"
// +kubebuilder:validation:XValidation:rule="!isCIDR(self) || cidr(self) == cidr(self).masked()",message="must be a network address: no bits may be set after the prefix length"
type CIDR string

// LocalTrafficDetectionMode says how a packet's source is recognised as coming
// from inside the cluster (a pod) rather than from outside.
//
// +kubebuilder:validation:Enum=ClusterCIDR;NodeCIDR;InterfaceNamePrefix
type LocalTrafficDetectionMode string

const (
	// DetectLocalByClusterCIDR treats sources inside spec.clusterCIDRs as pods.
	DetectLocalByClusterCIDR LocalTrafficDetectionMode = "ClusterCIDR"
	// DetectLocalByNodeCIDR treats sources inside this Node's spec.podCIDRs
	// as pods.
	DetectLocalByNodeCIDR LocalTrafficDetectionMode = "NodeCIDR"
	// DetectLocalByInterfaceNamePrefix treats packets arriving on an
	// interface whose name starts with interfaceNamePrefix as pod traffic.
	DetectLocalByInterfaceNamePrefix LocalTrafficDetectionMode = "InterfaceNamePrefix"
)

// LocalTrafficDetection says how a packet from a pod is told apart from a
// packet from outside the cluster. It decides which ClusterIP traffic is
// masqueraded and which traffic externalTrafficPolicy Local applies to.
//
// +kubebuilder:validation:XValidation:rule="self.mode == 'InterfaceNamePrefix' ? has(self.interfaceNamePrefix) : !has(self.interfaceNamePrefix)",message="interfaceNamePrefix is required when mode is InterfaceNamePrefix and not allowed otherwise",fieldPath=".interfaceNamePrefix"
type LocalTrafficDetection struct {
	// Mode is ClusterCIDR (sources inside spec.clusterCIDRs), NodeCIDR
	// (sources inside this Node's spec.podCIDRs) or InterfaceNamePrefix
	// (packets arriving on interfaces named interfaceNamePrefix*).
	//
	// +kubebuilder:default=ClusterCIDR
	// +optional
	Mode LocalTrafficDetectionMode `json:"mode,omitempty"`

	// InterfaceNamePrefix is the name prefix of the host's pod interfaces
	// (for example "veth" or "cali"), used when mode is InterfaceNamePrefix.
	//
	// +kubebuilder:validation:MinLength=1
	// +kubebuilder:validation:MaxLength=15
	// +kubebuilder:validation:Pattern=`^[a-zA-Z0-9_.-]+$`
	// +optional
	InterfaceNamePrefix string `json:"interfaceNamePrefix,omitempty"`
}

// ProxyConfigSpec holds every knob of a node's proxy. Each field has a
// default, so an empty spec (or no ProxyConfig at all) is a working setup.
//
// +kubebuilder:validation:XValidation:rule="!has(self.minSyncInterval) || !has(self.syncInterval) || !self.minSyncInterval.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || !self.syncInterval.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') || duration(self.minSyncInterval) <= duration(self.syncInterval)",message="minSyncInterval must not be longer than syncInterval",fieldPath=".minSyncInterval"
type ProxyConfigSpec struct {
	// ClusterCIDRs are the cluster's pod CIDRs: at most one IPv4 and one
	// IPv6. With localTrafficDetection mode ClusterCIDR, traffic to a
	// ClusterIP from a source outside them is masqueraded so that replies
	// return through this node. Left empty in that mode, no source counts
	// as outside and only masqueradeAll masquerades ClusterIP traffic.
	//
	// +kubebuilder:validation:MaxItems=2
	// +kubebuilder:validation:XValidation:rule="self.size() < 2 || !isCIDR(self[0]) || !isCIDR(self[1]) || cidr(self[0]).ip().family() != cidr(self[1]).ip().family()",message="may hold at most one IPv4 and one IPv6 CIDR"
	// +listType=set
	// +optional
	ClusterCIDRs []CIDR `json:"clusterCIDRs,omitempty"`

	// MasqueradeAll masquerades every packet sent to a ClusterIP, whatever
	// its source. Pods then see the node's address instead of the client's.
	//
	// +kubebuilder:default=false
	// +optional
	MasqueradeAll bool `json:"masqueradeAll"`

	// MasqueradeBit is the bit of the packet mark (0..31) that flags a
	// packet for masquerading in postrouting. The default, 14 (0x4000), is
	// kube-proxy's; choose another if a CNI on the node uses that bit.
	//
	// +kubebuilder:default=14
	// +kubebuilder:validation:Minimum=0
	// +kubebuilder:validation:Maximum=31
	// +optional
	MasqueradeBit *int32 `json:"masqueradeBit,omitempty"`

	// NodePortAddresses limits NodePorts to the node addresses inside these
	// CIDRs. Empty means every address of the node except loopback; to serve
	// NodePorts on 127.0.0.1, list 127.0.0.0/8 (or ::1/128) explicitly.
	//
	// +kubebuilder:validation:MaxItems=16
	// +listType=set
	// +optional
	NodePortAddresses []CIDR `json:"nodePortAddresses,omitempty"`

	// AllowedExternalIPCIDRs limits spec.externalIPs of Services to these
	// CIDRs; an externalIP outside them is not programmed and the Service
	// gets an Event. Empty allows any externalIP. Set it to guard against
	// CVE-2020-8554-style traffic hijacking by anyone who can write Services.
	//
	// +kubebuilder:validation:MaxItems=64
	// +listType=set
	// +optional
	AllowedExternalIPCIDRs []CIDR `json:"allowedExternalIPCIDRs,omitempty"`

	// MinSyncInterval is the shortest time between two writes to the
	// kernel: changes arriving faster are coalesced into one write. 0s
	// writes every change at once.
	//
	// +kubebuilder:default="1s"
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') && duration(self) <= duration('5m')",message="must be a duration from 0s to 5m, such as 1s or 500ms"
	// +optional
	MinSyncInterval *metav1.Duration `json:"minSyncInterval,omitempty"`

	// SyncInterval is how often the whole table is checked and rewritten
	// when nothing changes, and the longest wait before retrying a failed
	// write. A node whose last successful write is older than twice this
	// is reported unhealthy.
	//
	// +kubebuilder:default="30s"
	// +kubebuilder:validation:Type=string
	// +kubebuilder:validation:XValidation:rule="self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$') && duration(self) >= duration('1s') && duration(self) <= duration('24h')",message="must be a duration from 1s to 24h, such as 30s or 5m"
	// +optional
	SyncInterval *metav1.Duration `json:"syncInterval,omitempty"`

	// UDPConntrackCleanup deletes the conntrack entries of UDP flows whose
	// endpoint was removed, so UDP clients (DNS above all) move to a live
	// endpoint at once instead of waiting for the entry to time out.
	//
	// +kubebuilder:default=true
	// +optional
	UDPConntrackCleanup *bool `json:"udpConntrackCleanup,omitempty"`

	// LocalTrafficDetection says how packets from pods are told apart from
	// packets from outside the cluster.
	//
	// +kubebuilder:default={mode: ClusterCIDR}
	// +optional
	LocalTrafficDetection *LocalTrafficDetection `json:"localTrafficDetection,omitempty"`
}

// Condition types of a ProxyConfig.
const (
	// ConditionAccepted is True when the agents could use the current
	// generation of the ProxyConfig.
	ConditionAccepted = "Accepted"
	// ConditionDegraded is True when some agent using this ProxyConfig
	// failed to program its node.
	ConditionDegraded = "Degraded"
)

// NodeSummary counts the agents that use a ProxyConfig.
type NodeSummary struct {
	// Total is the number of agents that use this ProxyConfig.
	// +optional
	Total int32 `json:"total"`

	// Current is the number of agents that have programmed their node
	// with the ProxyConfig's current generation.
	// +optional
	Current int32 `json:"current"`

	// Degraded is the number of agents whose last write to the kernel
	// failed.
	// +optional
	Degraded int32 `json:"degraded"`
}

// ProxyConfigStatus is what the agents report about a ProxyConfig.
type ProxyConfigStatus struct {
	// Conditions are Accepted and Degraded, each with the generation it
	// was computed for.
	//
	// +listType=map
	// +listMapKey=type
	// +optional
	Conditions []metav1.Condition `json:"conditions,omitempty"`

	// Nodes counts the agents that use this ProxyConfig.
	// +optional
	Nodes NodeSummary `json:"nodes,omitempty"`
}

// ProxyConfig configures the nftproxy agents of the nodes that name it with
// --config-name (default "default"). Agents whose ProxyConfig does not exist
// run with the defaults.
//
// +kubebuilder:object:root=true
// +kubebuilder:subresource:status
// +kubebuilder:resource:scope=Cluster,shortName=pxc,categories=nftproxy
// +kubebuilder:printcolumn:name="Accepted",type=string,JSONPath=`.status.conditions[?(@.type=="Accepted")].status`
// +kubebuilder:printcolumn:name="Degraded",type=string,JSONPath=`.status.conditions[?(@.type=="Degraded")].status`
// +kubebuilder:printcolumn:name="Nodes",type=integer,JSONPath=`.status.nodes.total`
// +kubebuilder:printcolumn:name="Current",type=integer,JSONPath=`.status.nodes.current`
// +kubebuilder:printcolumn:name="Masq-All",type=boolean,JSONPath=`.spec.masqueradeAll`,priority=1
// +kubebuilder:printcolumn:name="Masq-Bit",type=integer,JSONPath=`.spec.masqueradeBit`,priority=1
// +kubebuilder:printcolumn:name="Age",type=date,JSONPath=`.metadata.creationTimestamp`
type ProxyConfig struct {
	metav1.TypeMeta   `json:",inline"`
	metav1.ObjectMeta `json:"metadata,omitempty"`

	// +kubebuilder:default={}
	// +optional
	Spec ProxyConfigSpec `json:"spec,omitempty"`
	// +optional
	Status ProxyConfigStatus `json:"status,omitempty"`
}

// ProxyConfigList is a list of ProxyConfigs.
//
// +kubebuilder:object:root=true
type ProxyConfigList struct {
	metav1.TypeMeta `json:",inline"`
	metav1.ListMeta `json:"metadata,omitempty"`
	Items           []ProxyConfig `json:"items"`
}
