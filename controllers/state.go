package controllers

import (
	"net/netip"
	"reflect"
	"slices"
	"strings"
	"sync"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/dataplane"
)

// NodeInfo is what the proxy uses of its own Node object.
type NodeInfo struct {
	// Found is false while the Node does not exist (yet).
	Found     bool
	Addresses []netip.Addr
	Zone      string
	PodCIDRs  []netip.Prefix
}

// State is the cluster as the reconcilers last saw it, with a record of
// what changed since the syncer last took it. Reconcilers write to it and
// wake the syncer; only the syncer reads it. Safe for concurrent use.
type State struct {
	mu sync.Mutex
	// services are the pending Service states by key; a nil Service
	// means the Service is gone.
	services map[types.NamespacedName]dataplane.ServiceState
	// triggered holds, per pending Service, the change-trigger times of
	// its EndpointSlices' new versions, for network programming latency.
	triggered map[types.NamespacedName][]time.Time
	// versions are the resourceVersions of each Service and its slices as
	// last set, so that reading them again (the reconcilers' initial pass
	// after the first sync loaded everything) is not a change.
	versions  map[types.NamespacedName]string
	node      *NodeInfo
	lastNode  *NodeInfo
	config    *EffectiveConfig
	changedAt time.Time
	wake      chan struct{}
}

// NewState returns an empty State.
func NewState() *State {
	return &State{
		services:  map[types.NamespacedName]dataplane.ServiceState{},
		triggered: map[types.NamespacedName][]time.Time{},
		versions:  map[types.NamespacedName]string{},
		wake:      make(chan struct{}, 1),
	}
}

// Wake is signalled (without blocking writers) whenever something changes.
func (s *State) Wake() <-chan struct{} { return s.wake }

func (s *State) changedLocked() {
	if s.changedAt.IsZero() {
		s.changedAt = time.Now()
	}
	select {
	case s.wake <- struct{}{}:
	default:
	}
}

// SetService records a Service's state; st.Service nil means it is gone.
// triggered are the endpoints.kubernetes.io/last-change-trigger-time
// values of slice versions not seen before.
func (s *State) SetService(key types.NamespacedName, st dataplane.ServiceState, triggered ...time.Time) {
	version, known := versionOf(st)
	s.mu.Lock()
	defer s.mu.Unlock()
	if old, ok := s.versions[key]; known && ok && old == version || st.Service == nil && !ok {
		return // the same objects again, or a Service never seen is gone
	}
	if known && st.Service != nil {
		s.versions[key] = version
	} else if st.Service == nil {
		delete(s.versions, key)
	} else {
		s.versions[key] = "\x00unknown" // matches no later version
	}
	s.services[key] = st
	if len(triggered) > 0 {
		s.triggered[key] = append(s.triggered[key], triggered...)
	}
	s.changedLocked()
}

// SetNode records this node's Node, if what the proxy uses of it changed:
// Node objects change every few seconds for reasons the proxy ignores.
func (s *State) SetNode(n NodeInfo) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.lastNode != nil && reflect.DeepEqual(*s.lastNode, n) {
		return
	}
	s.lastNode, s.node = &n, &n
	s.changedLocked()
}

// SetConfig records the effective ProxyConfig.
func (s *State) SetConfig(c EffectiveConfig) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.config = &c
	s.changedLocked()
}

// Changes is what happened since the previous Take.
type Changes struct {
	// Services are the Services written, by key; a nil Service is gone.
	Services map[types.NamespacedName]dataplane.ServiceState
	// Triggered are the change-trigger times of those Services' slices.
	Triggered map[types.NamespacedName][]time.Time
	// Node and Config are set when they changed.
	Node   *NodeInfo
	Config *EffectiveConfig
	// Since is when the oldest of these changes arrived.
	Since time.Time
}

// Empty reports whether nothing changed.
func (c Changes) Empty() bool {
	return len(c.Services) == 0 && c.Node == nil && c.Config == nil
}

// Take returns and forgets the changes recorded so far.
func (s *State) Take() Changes {
	s.mu.Lock()
	defer s.mu.Unlock()
	c := Changes{Services: s.services, Triggered: s.triggered, Node: s.node, Config: s.config, Since: s.changedAt}
	s.services = map[types.NamespacedName]dataplane.ServiceState{}
	s.triggered = map[types.NamespacedName][]time.Time{}
	s.node, s.config, s.changedAt = nil, nil, time.Time{}
	return c
}

// Pending is how many Services changed since the last Take, and since when.
func (s *State) Pending() (services int, since time.Time) {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := len(s.services)
	if s.node != nil || s.config != nil {
		n++
	}
	return n, s.changedAt
}

// versionOf fingerprints a Service and its slices by resourceVersion;
// known is false when an object has none (objects built in tests).
func versionOf(st dataplane.ServiceState) (version string, known bool) {
	if st.Service == nil {
		return "", true
	}
	if st.Service.ResourceVersion == "" {
		return "", false
	}
	parts := make([]string, 0, len(st.Slices))
	for _, sl := range st.Slices {
		if sl.ResourceVersion == "" {
			return "", false
		}
		parts = append(parts, sl.Name+"@"+sl.ResourceVersion)
	}
	slices.Sort(parts)
	return st.Service.ResourceVersion + "|" + strings.Join(parts, ","), true
}
