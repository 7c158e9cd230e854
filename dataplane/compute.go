package dataplane

import (
	"cmp"
	"fmt"
	"maps"
	"slices"
	"sync/atomic"

	"k8s.io/apimachinery/pkg/types"
)

// Compute returns the desired ruleset for a snapshot. It is a pure
// function: the same snapshot always gives the same Ruleset.
func Compute(snap *Snapshot) *Ruleset {
	return NewComputer().Compute(snap)
}

// Computer computes Rulesets for a stream of snapshots, recomputing only
// the Services whose objects changed since the previous one, so a change
// to one Service among 50,000 costs microseconds rather than a rebuild.
// Its output for a snapshot is exactly Compute's. A Computer is not safe
// for concurrent use.
type Computer struct {
	settings *settings
	base     *Base
	memo     map[types.NamespacedName]*memo
	// claims holds, per contested key, every Service that wants it, best
	// first; the first one gets the element.
	claims map[claimKey][]claimant
	rules  map[types.NamespacedName]*ServiceRules
	// indexes allocates runs in each endpoint map.
	indexes map[string]*indexAllocator
	// last is the generation of the last Ruleset computed.
	last uint64
	// updates counts the fragments that use each shared affinity update
	// chain; shared is the list of those chains, rebuilt when one comes
	// or goes.
	updates map[affinityUpdate]int
	shared  []*Chain
}

type memo struct {
	svc    any // the *corev1.Service, compared by identity
	slices []any
	frag   *fragment
	// runs are the endpoint-map indexes each service chain holds.
	runs map[string]indexRun
}

type claimKey struct {
	group claimGroup
	key   Key
}

type claimant struct {
	rank    claimRank
	service types.NamespacedName
}

func compareClaimants(a, b claimant) int {
	if c := cmp.Compare(a.rank, b.rank); c != 0 {
		return c
	}
	if c := cmp.Compare(a.service.Namespace, b.service.Namespace); c != 0 {
		return c
	}
	return cmp.Compare(a.service.Name, b.service.Name)
}

// NewComputer returns a Computer with nothing computed yet.
func NewComputer() *Computer {
	return &Computer{}
}

// Compute returns the desired ruleset for snap, reusing the previous
// results of Services whose Service and slice objects are the same ones
// (by identity) as in the previous snapshot. It looks at every Service;
// ComputeChanged looks only at those the caller names.
func (c *Computer) Compute(snap *Snapshot) *Ruleset {
	return c.compute(snap, nil, true)
}

// ComputeChanged is Compute for a snapshot that differs from the previous
// one only in the Services listed (changed, added or removed), so its cost
// does not grow with the number of Services. A change of settings (config,
// node) still recomputes everything.
func (c *Computer) ComputeChanged(snap *Snapshot, changed []types.NamespacedName) *Ruleset {
	return c.compute(snap, changed, false)
}

func (c *Computer) compute(snap *Snapshot, candidates []types.NamespacedName, scanAll bool) *Ruleset {
	s := newSettings(snap)
	if !s.equal(c.settings) {
		c.settings = s
		c.base = buildBase(s)
		c.base.problems = s.problems
		c.memo = map[types.NamespacedName]*memo{}
		c.claims = map[claimKey][]claimant{}
		c.rules = map[types.NamespacedName]*ServiceRules{}
		c.indexes = map[string]*indexAllocator{}
		c.updates = map[affinityUpdate]int{}
		c.shared = nil
		c.last = 0
		scanAll = true
	}

	var changed, removed []types.NamespacedName
	if scanAll {
		existing := 0 // changed Services that were there before
		for key, st := range snap.Services {
			if old := c.memo[key]; old == nil || !old.matches(st) {
				changed = append(changed, key)
				if old != nil {
					existing++
				}
			}
		}
		// memo holds the unchanged, the changed existing and the removed
		// Services; snap the unchanged, the changed existing and the new.
		if len(c.memo)-existing > len(snap.Services)-len(changed) {
			for key := range c.memo {
				if _, ok := snap.Services[key]; !ok {
					removed = append(removed, key)
				}
			}
		}
	} else {
		for _, key := range candidates {
			st, ok := snap.Services[key]
			old := c.memo[key]
			switch {
			case !ok && old != nil:
				removed = append(removed, key)
			case ok && (old == nil || !old.matches(st)):
				changed = append(changed, key)
			}
		}
	}
	// In a fixed order, so that index allocation is deterministic.
	slices.SortFunc(changed, compareNames)
	changed = slices.Compact(changed)
	slices.SortFunc(removed, compareNames)
	removed = slices.Compact(removed)

	dirty := map[types.NamespacedName]bool{}
	sharedChanged := false
	for _, key := range removed {
		m := c.memo[key]
		for _, r := range m.runs {
			c.allocator(r.set).release(r)
		}
		c.unclaim(key, m.frag, dirty)
		sharedChanged = c.countUpdates(m.frag, -1) || sharedChanged
		delete(c.memo, key)
		dirty[key] = true
	}
	for _, key := range changed {
		sharedChanged = c.update(key, snap.Services[key], dirty) || sharedChanged
	}
	if sharedChanged {
		c.shared = make([]*Chain, 0, len(c.updates))
		for u := range c.updates {
			c.shared = append(c.shared, affinityUpdateChain(u))
		}
		slices.SortFunc(c.shared, func(a, b *Chain) int { return cmp.Compare(a.Name, b.Name) })
	}

	rs := &Ruleset{Base: c.base, Shared: c.shared, generation: generations.Add(1)}
	if c.last != 0 {
		rs.derivedFrom = c.last
		rs.changed = slices.Collect(maps.Keys(dirty))
	}
	if len(dirty) > 0 {
		c.rules = maps.Clone(c.rules)
		for key := range dirty {
			m, ok := c.memo[key]
			if !ok {
				delete(c.rules, key)
				continue
			}
			c.rules[key] = c.resolve(key, m.frag)
		}
	}
	rs.Services = c.rules
	c.last = rs.generation
	return rs
}

// generations numbers Rulesets across all Computers.
var generations atomic.Uint64

// countUpdates adds delta to the uses of each shared chain fr needs and
// reports whether a chain came or went.
func (c *Computer) countUpdates(fr *fragment, delta int) bool {
	changed := false
	for _, u := range fr.updates {
		n := c.updates[u] + delta
		if n == 0 {
			delete(c.updates, u)
		} else {
			c.updates[u] = n
		}
		changed = changed || n == 0 || n == delta
	}
	return changed
}

// update computes one Service again, keeping the index runs its chains
// still fit in; it reports whether a shared chain came or went.
func (c *Computer) update(key types.NamespacedName, st ServiceState, dirty map[types.NamespacedName]bool) bool {
	old := c.memo[key]
	m := newMemo(st)
	m.frag = computeService(key, st, c.settings, func(endpointMap, chain string, n int) uint32 {
		r, ok := old.run(chain)
		if !ok || r.size < uint32(n) {
			r = c.allocator(endpointMap).alloc(endpointMap, uint32(n))
		}
		m.runs[chain] = r
		return r.offset
	})
	changed := c.countUpdates(m.frag, 1)
	if old != nil {
		for chain, r := range old.runs {
			if m.runs[chain] != r {
				c.allocator(r.set).release(r)
			}
		}
		c.unclaim(key, old.frag, dirty)
		changed = c.countUpdates(old.frag, -1) || changed
	}
	c.claim(key, m.frag, dirty)
	c.memo[key] = m
	dirty[key] = true
	return changed
}

func (c *Computer) allocator(endpointMap string) *indexAllocator {
	a := c.indexes[endpointMap]
	if a == nil {
		a = &indexAllocator{}
		c.indexes[endpointMap] = a
	}
	return a
}

func newMemo(st ServiceState) *memo {
	m := &memo{svc: st.Service, slices: make([]any, len(st.Slices)), runs: map[string]indexRun{}}
	for i, sl := range st.Slices {
		m.slices[i] = sl
	}
	return m
}

func (m *memo) run(chain string) (indexRun, bool) {
	if m == nil {
		return indexRun{}, false
	}
	r, ok := m.runs[chain]
	return r, ok
}

func (m *memo) matches(st ServiceState) bool {
	if m.svc != any(st.Service) || len(m.slices) != len(st.Slices) {
		return false
	}
	for i, sl := range st.Slices {
		if m.slices[i] != any(sl) {
			return false
		}
	}
	return true
}

// claim records a Service's claims; when the best claimant of a key
// changes, every claimant of it must be resolved again.
func (c *Computer) claim(svc types.NamespacedName, fr *fragment, dirty map[types.NamespacedName]bool) {
	for _, cl := range fr.claims {
		k := claimKey{cl.group, cl.Key}
		list := c.claims[k]
		me := claimant{cl.rank, svc}
		i, found := slices.BinarySearchFunc(list, me, compareClaimants)
		if found {
			continue // the same Service claims a key twice: a problem is reported in resolve
		}
		list = slices.Insert(list, i, me)
		c.claims[k] = list
		if i == 0 && len(list) > 1 {
			markAll(list, dirty)
		}
	}
}

func (c *Computer) unclaim(svc types.NamespacedName, fr *fragment, dirty map[types.NamespacedName]bool) {
	for _, cl := range fr.claims {
		k := claimKey{cl.group, cl.Key}
		list := c.claims[k]
		i, found := slices.BinarySearchFunc(list, claimant{cl.rank, svc}, compareClaimants)
		if !found {
			continue
		}
		list = slices.Delete(list, i, i+1)
		if len(list) == 0 {
			delete(c.claims, k)
			continue
		}
		c.claims[k] = list
		if i == 0 {
			markAll(list, dirty)
		}
	}
}

func markAll(list []claimant, dirty map[types.NamespacedName]bool) {
	for _, cl := range list {
		dirty[cl.service] = true
	}
}

// resolve builds a Service's rules from its fragment, keeping the claims
// it wins and reporting those another Service holds.
func (c *Computer) resolve(svc types.NamespacedName, fr *fragment) *ServiceRules {
	r := &ServiceRules{Chains: fr.chains, Problems: slices.Clone(fr.problems), Ports: fr.ports, HealthCheckNodePort: fr.healthCheckNodePort,
		Elements: make([]Element, len(fr.owned), len(fr.owned)+len(fr.claims))}
	copy(r.Elements, fr.owned)
	for i, cl := range fr.claims {
		k := claimKey{cl.group, cl.Key}
		if slices.ContainsFunc(fr.claims[:i], func(o claim) bool { return o.group == cl.group && o.Key == cl.Key }) {
			if cl.frontend != "" {
				r.Problems = append(r.Problems, fmt.Sprintf("%s is listed twice; programmed once", cl.describe()))
			}
			continue
		}
		winner := c.claims[k][0]
		if winner.service == svc && winner.rank == cl.rank {
			r.Elements = append(r.Elements, cl.Element)
			r.Elements = append(r.Elements, cl.extra...)
			continue
		}
		if cl.frontend != "" {
			r.Problems = append(r.Problems, fmt.Sprintf("%s is also claimed by %s; not programmed for this Service", cl.describe(), winner.service))
		}
	}
	slices.SortFunc(r.Elements, compareElements)
	return r
}

func compareElements(a, b Element) int {
	if c := cmp.Compare(a.Set, b.Set); c != 0 {
		return c
	}
	return compareKeys(a.Key, b.Key)
}

func compareKeys(a, b Key) int {
	if c := a.Addr.Compare(b.Addr); c != 0 {
		return c
	}
	if c := a.Addr2.Compare(b.Addr2); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Index, b.Index); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Proto, b.Proto); c != 0 {
		return c
	}
	if c := cmp.Compare(a.Port, b.Port); c != 0 {
		return c
	}
	if c := a.Source.Addr().Compare(b.Source.Addr()); c != 0 {
		return c
	}
	return cmp.Compare(a.Source.Bits(), b.Source.Bits())
}

// Problems lists, sorted, everything the ruleset could not program: the
// config's problems first, then each Service's as "namespace/name: ...".
func (r *Ruleset) Problems() []string {
	out := slices.Clone(r.Base.problems)
	for _, key := range r.ServiceKeys() {
		for _, p := range r.Services[key].Problems {
			out = append(out, key.String()+": "+p)
		}
	}
	return out
}

// ServiceKeys returns the Services of the ruleset, sorted.
func (r *Ruleset) ServiceKeys() []types.NamespacedName {
	keys := slices.Collect(maps.Keys(r.Services))
	slices.SortFunc(keys, compareNames)
	return keys
}

func compareNames(a, b types.NamespacedName) int {
	if c := cmp.Compare(a.Namespace, b.Namespace); c != 0 {
		return c
	}
	return cmp.Compare(a.Name, b.Name)
}

// indexRun is a run of indexes in an endpoint map held by one service chain.
type indexRun struct {
	set          string
	offset, size uint32
}

// indexAllocator hands out runs of endpoint-map indexes, sized in powers of
// two so that a run freed by one Service port fits the next of its size
// class, and a port whose endpoints change keeps its run (and so its
// rule) unless it outgrows it.
type indexAllocator struct {
	next uint32
	free map[uint32][]uint32 // offsets of free runs, by size
}

func (a *indexAllocator) alloc(set string, n uint32) indexRun {
	size := uint32(1)
	for size < n {
		size <<= 1
	}
	if list := a.free[size]; len(list) > 0 {
		off := list[len(list)-1]
		a.free[size] = list[:len(list)-1]
		return indexRun{set, off, size}
	}
	r := indexRun{set, a.next, size}
	a.next += size
	return r
}

func (a *indexAllocator) release(r indexRun) {
	if a.free == nil {
		a.free = map[uint32][]uint32{}
	}
	a.free[r.size] = append(a.free[r.size], r.offset)
}
