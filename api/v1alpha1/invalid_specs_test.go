package v1alpha1_test

// invalidSpecs are ProxyConfig specs that must be refused, each with the
// field path that the refusal must name. Both the API server (CRD markers
// and CEL) and Validate run over the whole table.
var invalidSpecs = []struct {
	name  string
	spec  string // JSON
	field string
}{
	{"cluster CIDR that is no CIDR", `{"clusterCIDRs": ["not-a-cidr"]}`, "spec.clusterCIDRs[0]"},
	{"cluster CIDR without prefix length", `{"clusterCIDRs": ["10.244.0.0"]}`, "spec.clusterCIDRs[0]"},
	{"cluster CIDR prefix too long", `{"clusterCIDRs": ["10.244.0.0/33"]}`, "spec.clusterCIDRs[0]"},
	{"cluster CIDR with host bits", `{"clusterCIDRs": ["10.244.0.1/16"]}`, "spec.clusterCIDRs[0]"},
	{"second cluster CIDR bad", `{"clusterCIDRs": ["10.244.0.0/16", "fd00::1::/64"]}`, "spec.clusterCIDRs[1]"},
	{"two IPv4 cluster CIDRs", `{"clusterCIDRs": ["10.244.0.0/16", "10.245.0.0/16"]}`, "spec.clusterCIDRs"},
	{"two IPv6 cluster CIDRs", `{"clusterCIDRs": ["fd00:1::/64", "fd00:2::/64"]}`, "spec.clusterCIDRs"},
	{"three cluster CIDRs", `{"clusterCIDRs": ["10.244.0.0/16", "fd00::/64", "10.245.0.0/16"]}`, "spec.clusterCIDRs"},
	{"mark bit 32", `{"masqueradeBit": 32}`, "spec.masqueradeBit"},
	{"negative mark bit", `{"masqueradeBit": -1}`, "spec.masqueradeBit"},
	{"NodePort address without prefix", `{"nodePortAddresses": ["192.168.1.1"]}`, "spec.nodePortAddresses[0]"},
	{"NodePort address with host bits", `{"nodePortAddresses": ["192.168.1.0/24", "192.168.2.1/24"]}`, "spec.nodePortAddresses[1]"},
	{"NodePort CIDR listed twice", `{"nodePortAddresses": ["192.168.1.0/24", "192.168.1.0/24"]}`, "spec.nodePortAddresses[1]"},
	{"externalIP CIDR with host bits", `{"allowedExternalIPCIDRs": ["2001:db8::1/32"]}`, "spec.allowedExternalIPCIDRs[0]"},
	{"externalIP CIDR that is a name", `{"allowedExternalIPCIDRs": ["example.com/24"]}`, "spec.allowedExternalIPCIDRs[0]"},
	{"negative minimum sync interval", `{"minSyncInterval": "-1s"}`, "spec.minSyncInterval"},
	{"minimum sync interval too long", `{"minSyncInterval": "10m", "syncInterval": "1h"}`, "spec.minSyncInterval"},
	{"zero sync interval", `{"syncInterval": "0s"}`, "spec.syncInterval"},
	{"negative sync interval", `{"syncInterval": "-30s"}`, "spec.syncInterval"},
	{"sync interval that is no duration", `{"syncInterval": "forever"}`, "spec.syncInterval"},
	{"minimum sync interval in days", `{"minSyncInterval": "1d"}`, "spec.minSyncInterval"},
	{"sync interval over a day", `{"syncInterval": "25h"}`, "spec.syncInterval"},
	{"minimum sync interval above sync interval", `{"minSyncInterval": "1m", "syncInterval": "30s"}`, "spec.minSyncInterval"},
	{"unknown detection mode", `{"localTrafficDetection": {"mode": "Bridge"}}`, "spec.localTrafficDetection.mode"},
	{"interface mode without prefix", `{"localTrafficDetection": {"mode": "InterfaceNamePrefix"}}`, "spec.localTrafficDetection.interfaceNamePrefix"},
	{"interface prefix too long", `{"localTrafficDetection": {"mode": "InterfaceNamePrefix", "interfaceNamePrefix": "averyveryverylongname"}}`, "spec.localTrafficDetection.interfaceNamePrefix"},
	{"interface prefix with a wildcard", `{"localTrafficDetection": {"mode": "InterfaceNamePrefix", "interfaceNamePrefix": "veth*"}}`, "spec.localTrafficDetection.interfaceNamePrefix"},
	{"prefix without interface mode", `{"localTrafficDetection": {"mode": "NodeCIDR", "interfaceNamePrefix": "veth"}}`, "spec.localTrafficDetection.interfaceNamePrefix"},
}
