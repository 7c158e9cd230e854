package v1alpha1

import (
	"net/netip"
	"regexp"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/validation/field"
)

// Defaults of ProxyConfigSpec; the CRD's +kubebuilder:default markers say
// the same, and a test keeps the two in step.
const (
	DefaultMasqueradeBit   int32 = 14
	DefaultMinSyncInterval       = time.Second
	DefaultSyncInterval          = 30 * time.Second
)

// Default fills every unset field with its default. The API server already
// does this for stored objects; the agent calls it for a ProxyConfig that
// does not exist (an empty spec) and for objects written by older clients.
func (s *ProxyConfigSpec) Default() {
	if s.MasqueradeBit == nil {
		bit := DefaultMasqueradeBit
		s.MasqueradeBit = &bit
	}
	if s.MinSyncInterval == nil {
		s.MinSyncInterval = &metav1.Duration{Duration: DefaultMinSyncInterval}
	}
	if s.SyncInterval == nil {
		s.SyncInterval = &metav1.Duration{Duration: DefaultSyncInterval}
	}
	if s.UDPConntrackCleanup == nil {
		cleanup := true
		s.UDPConntrackCleanup = &cleanup
	}
	if s.LocalTrafficDetection == nil {
		s.LocalTrafficDetection = &LocalTrafficDetection{}
	}
	if s.LocalTrafficDetection.Mode == "" {
		s.LocalTrafficDetection.Mode = DetectLocalByClusterCIDR
	}
}

// Validate checks a defaulted spec by the rules the CRD makes the API
// server enforce, so that the agent never programs a node from a spec that
// slipped past them (an older CRD, a hand-edited etcd). It returns every
// problem found, each naming its field under "spec", or nil.
func (s *ProxyConfigSpec) Validate() error {
	spec := field.NewPath("spec")
	var errs field.ErrorList

	clusterCIDRs := spec.Child("clusterCIDRs")
	prefixes, cidrErrs := validateCIDRs(clusterCIDRs, s.ClusterCIDRs, 2)
	errs = append(errs, cidrErrs...)
	if len(prefixes) == 2 && prefixes[0].Addr().Is4() == prefixes[1].Addr().Is4() {
		errs = append(errs, field.Invalid(clusterCIDRs, s.ClusterCIDRs, "may hold at most one IPv4 and one IPv6 CIDR"))
	}
	_, cidrErrs = validateCIDRs(spec.Child("nodePortAddresses"), s.NodePortAddresses, 16)
	errs = append(errs, cidrErrs...)
	_, cidrErrs = validateCIDRs(spec.Child("allowedExternalIPCIDRs"), s.AllowedExternalIPCIDRs, 64)
	errs = append(errs, cidrErrs...)

	if s.MasqueradeBit != nil && (*s.MasqueradeBit < 0 || *s.MasqueradeBit > 31) {
		errs = append(errs, field.Invalid(spec.Child("masqueradeBit"), *s.MasqueradeBit, "must be between 0 and 31"))
	}
	if s.MinSyncInterval != nil {
		if d := s.MinSyncInterval.Duration; d < 0 || d > 5*time.Minute {
			errs = append(errs, field.Invalid(spec.Child("minSyncInterval"), d.String(), "must be between 0s and 5m"))
		}
	}
	if s.SyncInterval != nil {
		if d := s.SyncInterval.Duration; d < time.Second || d > 24*time.Hour {
			errs = append(errs, field.Invalid(spec.Child("syncInterval"), d.String(), "must be between 1s and 24h"))
		}
	}
	if s.MinSyncInterval != nil && s.SyncInterval != nil && s.MinSyncInterval.Duration > s.SyncInterval.Duration {
		errs = append(errs, field.Invalid(spec.Child("minSyncInterval"), s.MinSyncInterval.Duration.String(), "must not be longer than syncInterval"))
	}
	if d := s.LocalTrafficDetection; d != nil {
		path := spec.Child("localTrafficDetection")
		switch d.Mode {
		case DetectLocalByClusterCIDR, DetectLocalByNodeCIDR, DetectLocalByInterfaceNamePrefix:
		default:
			errs = append(errs, field.NotSupported(path.Child("mode"), d.Mode, []LocalTrafficDetectionMode{
				DetectLocalByClusterCIDR, DetectLocalByNodeCIDR, DetectLocalByInterfaceNamePrefix}))
		}
		prefix := path.Child("interfaceNamePrefix")
		if (d.Mode == DetectLocalByInterfaceNamePrefix) != (d.InterfaceNamePrefix != "") {
			errs = append(errs, field.Invalid(prefix, d.InterfaceNamePrefix,
				"is required when mode is InterfaceNamePrefix and not allowed otherwise"))
		}
		if len(d.InterfaceNamePrefix) > 15 {
			errs = append(errs, field.TooLong(prefix, d.InterfaceNamePrefix, 15))
		}
		if d.InterfaceNamePrefix != "" && !interfaceName.MatchString(d.InterfaceNamePrefix) {
			errs = append(errs, field.Invalid(prefix, d.InterfaceNamePrefix, "may hold only letters, digits, '_', '.' and '-'"))
		}
	}
	return errs.ToAggregate()
}

// interfaceName matches what Linux accepts in an interface name, less the
// characters that nftables' interface matching would read specially.
var interfaceName = regexp.MustCompile(`^[a-zA-Z0-9_.-]+$`)

// validateCIDRs parses a list of CIDRs, at most max of them, each written
// as its network address and listed once. It returns the prefixes that
// parsed.
func validateCIDRs(path *field.Path, cidrs []CIDR, max int) ([]netip.Prefix, field.ErrorList) {
	var errs field.ErrorList
	if len(cidrs) > max {
		errs = append(errs, field.TooMany(path, len(cidrs), max))
	}
	prefixes := make([]netip.Prefix, 0, len(cidrs))
	seen := make(map[CIDR]bool, len(cidrs))
	for i, c := range cidrs {
		prefix, err := netip.ParsePrefix(string(c))
		switch {
		case seen[c]:
			errs = append(errs, field.Duplicate(path.Index(i), c))
		case err != nil:
			errs = append(errs, field.Invalid(path.Index(i), c, "must be a CIDR such as 10.244.0.0/16 or fd00:10:244::/56"))
		case prefix != prefix.Masked():
			errs = append(errs, field.Invalid(path.Index(i), c, "must be a network address: no bits may be set after the prefix length"))
		default:
			prefixes = append(prefixes, prefix)
		}
		seen[c] = true
	}
	return prefixes, errs
}

// Prefixes returns the CIDRs as parsed prefixes, skipping any that do not
// parse (Validate reports those).
func Prefixes(cidrs []CIDR) []netip.Prefix {
	prefixes := make([]netip.Prefix, 0, len(cidrs))
	for _, c := range cidrs {
		if prefix, err := netip.ParsePrefix(string(c)); err == nil {
			prefixes = append(prefixes, prefix)
		}
	}
	return prefixes
}
