package agent

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/controllers"
	"github.com/nftproxy/nftproxy/dataplane"
)

// fullResyncPeriod is how often the table is rewritten from scratch even
// when every write succeeded, to undo anything written to it behind our
// back. Between full resyncs, syncInterval ticks recompute everything and
// write only the difference.
const fullResyncPeriod = time.Hour

// Replacer is an Applier that can also rewrite the whole table, which the
// syncer does after a failed write and every fullResyncPeriod.
type Replacer interface {
	Replace(ctx context.Context, rs *dataplane.Ruleset) error
}

// SyncResult describes one successful write, for the hooks that follow it.
type SyncResult struct {
	Ruleset, Previous *dataplane.Ruleset
	Snapshot          *dataplane.Snapshot
	// Changed are the Services whose rules changed; All means every
	// Service must be looked at (the first sync, a config change).
	Changed []types.NamespacedName
	All     bool
	Full    bool
}

// Syncer keeps the kernel in step with State: it coalesces bursts of
// changes, waits at least minSyncInterval between writes, computes only
// what changed, writes the difference, and retries failed writes with
// backoff, rewriting the whole table after a failure.
type Syncer struct {
	State   *controllers.State
	Applier dataplane.Applier
	// WaitForCaches is waited for before the first sync: the caches have
	// synced and hold every object, so no partial view is ever written.
	WaitForCaches func(ctx context.Context) error
	// Load fills State with every Service from the synced caches.
	Load     func(ctx context.Context) error
	NodeName string
	Log      logr.Logger
	Metrics  *Metrics
	// AfterSync hooks run after each successful write, in order.
	AfterSync []func(ctx context.Context, r SyncResult)

	computer *dataplane.Computer
	snap     dataplane.Snapshot
	applied  *dataplane.Ruleset

	// mu guards what follows: the loop writes it, probes read it.
	mu            sync.Mutex
	config        *controllers.EffectiveConfig
	nodeSeen      bool
	configChanged bool // settings changed since the last write
	pendingKeys   []types.NamespacedName
	triggers      []time.Time
	lastSuccess   time.Time
	lastFull      time.Time
	firstSynced   bool
	appliedConfig int64
	lastErr       error
	failures      int
	pendingSince  time.Time
	startedAt     time.Time
	needFull      bool
}

// Start runs the sync loop until ctx ends (manager.Runnable).
func (s *Syncer) Start(ctx context.Context) error {
	s.startedAt = time.Now()
	s.mu.Lock()
	s.lastSuccess = s.startedAt
	s.mu.Unlock()
	s.computer = dataplane.NewComputer()
	s.snap = dataplane.Snapshot{NodeName: s.NodeName, Services: map[types.NamespacedName]dataplane.ServiceState{}}
	if s.WaitForCaches != nil {
		if err := s.WaitForCaches(ctx); err != nil {
			return err
		}
	}
	if s.Load != nil {
		if err := s.Load(ctx); err != nil {
			return fmt.Errorf("loading the initial state: %w", err)
		}
	}
	s.Log.Info("Caches synced; waiting for the ProxyConfig and the Node before the first sync")

	var (
		lastWrite time.Time
		retry     <-chan time.Time
	)
	tick := time.NewTimer(time.Hour)
	defer tick.Stop()
	for {
		full := false
		select {
		case <-ctx.Done():
			return nil
		case <-s.State.Wake():
		case <-retry:
			retry = nil
		case <-tick.C:
			full = true
		}
		if !s.absorb() {
			continue // no config or node yet
		}
		minInterval, syncInterval := s.intervals()
		if wait := minInterval - time.Since(lastWrite); wait > 0 && retry == nil {
			select {
			case <-ctx.Done():
				return nil
			case <-time.After(wait):
			}
			s.absorb()
		}
		err := s.sync(ctx, full)
		lastWrite = time.Now()
		if err != nil {
			s.mu.Lock()
			s.failures++
			backoff := min(time.Second<<min(s.failures-1, 10), syncInterval)
			s.mu.Unlock()
			s.Log.Error(err, "Sync failed; retrying with a full resync", "in", backoff.String())
			retry = time.After(backoff)
			continue
		}
		s.mu.Lock()
		s.failures = 0
		s.mu.Unlock()
		if !tick.Stop() {
			select {
			case <-tick.C:
			default:
			}
		}
		tick.Reset(syncInterval)
	}
}

// NeedLeaderElection is false: every agent programs its own node.
func (s *Syncer) NeedLeaderElection() bool { return false }

// absorb moves the changes recorded in State into the snapshot and says
// whether the syncer has what the first sync needs (config and node).
func (s *Syncer) absorb() bool {
	ch := s.State.Take()
	s.mu.Lock()
	defer s.mu.Unlock()
	if !ch.Since.IsZero() && (s.pendingSince.IsZero() || ch.Since.Before(s.pendingSince)) {
		s.pendingSince = ch.Since
	}
	for key, st := range ch.Services {
		if st.Service == nil {
			delete(s.snap.Services, key)
		} else {
			s.snap.Services[key] = st
		}
		s.pendingKeys = append(s.pendingKeys, key)
	}
	for _, times := range ch.Triggered {
		for _, t := range times {
			// Slices older than the agent changed before it was watching.
			if !t.Before(s.startedAt) {
				s.triggers = append(s.triggers, t)
			}
		}
	}
	if ch.Config != nil {
		s.config = ch.Config
		s.snap.Config = ch.Config.Spec
		s.configChanged = true
	}
	if ch.Node != nil {
		s.nodeSeen = true
		if !ch.Node.Found {
			s.Log.Info("This node's Node object does not exist; NodePorts are served on no address until it does", "node", s.NodeName)
		}
		s.snap.NodeAddresses = ch.Node.Addresses
		s.snap.NodeZone = ch.Node.Zone
		s.snap.NodePodCIDRs = ch.Node.PodCIDRs
		s.configChanged = true
	}
	return s.config != nil && s.nodeSeen
}

func (s *Syncer) intervals() (minSync, sync time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.config.Spec.MinSyncInterval.Duration, s.config.Spec.SyncInterval.Duration
}

// sync computes and writes the pending changes; periodic asks for a full
// recompute (and, every fullResyncPeriod, a full rewrite).
func (s *Syncer) sync(ctx context.Context, periodic bool) error {
	s.mu.Lock()
	keys, triggers := s.pendingKeys, s.triggers
	all := periodic || s.needFull || s.configChanged || s.applied == nil
	replace := s.needFull || s.applied == nil || time.Since(s.lastFull) >= fullResyncPeriod
	generation := s.config.Generation
	s.mu.Unlock()

	start := time.Now()
	var rs *dataplane.Ruleset
	if all {
		rs = s.computer.Compute(&s.snap)
	} else {
		rs = s.computer.ComputeChanged(&s.snap, keys)
	}
	var err error
	if r, ok := s.Applier.(Replacer); ok && replace {
		err = r.Replace(ctx, rs)
	} else {
		err = s.Applier.Apply(ctx, rs)
	}
	elapsed := time.Since(start)
	s.Metrics.observeSync(replace, all, elapsed, err)
	if err != nil {
		s.mu.Lock()
		s.needFull, s.lastErr = true, err
		s.mu.Unlock()
		return err
	}

	changed, known := rs.ChangedSince(s.applied)
	result := SyncResult{Ruleset: rs, Previous: s.applied, Snapshot: &s.snap, Changed: changed, All: !known, Full: replace}
	s.applied = rs
	now := time.Now()
	s.mu.Lock()
	s.pendingKeys, s.triggers = nil, nil
	s.configChanged, s.needFull, s.lastErr = false, false, nil
	s.lastSuccess = now
	if replace {
		s.lastFull = now
	}
	s.pendingSince = time.Time{}
	if !s.firstSynced {
		s.Log.Info("First sync written; ready", "services", len(rs.Services), "duration", elapsed.String())
	}
	s.firstSynced = true
	s.appliedConfig = generation
	s.mu.Unlock()
	s.Metrics.observeApplied(rs, triggers, now)
	if b, ok := s.Applier.(interface{ LastBatch() dataplane.BatchStats }); ok {
		s.Metrics.observeBatch(b.LastBatch())
	}
	s.Log.V(1).Info("Synced", "services", len(rs.Services), "full", replace, "recomputedAll", all, "duration", elapsed.String())
	for _, hook := range s.AfterSync {
		hook(ctx, result)
	}
	return nil
}

// Status is the syncer's view of its health, for probes and status reports.
type Status struct {
	// Synced is true once the first full sync has been written.
	Synced bool
	// LastSuccess is the time of the last successful write (or of the
	// start, before the first).
	LastSuccess time.Time
	// PendingSince is when the oldest change not yet written arrived;
	// zero when nothing is pending.
	PendingSince time.Time
	// ConfigGeneration is the ProxyConfig generation last written.
	ConfigGeneration int64
	// LastError is the error of the last write if it failed.
	LastError error
	// SyncInterval is the configured one (0 before the config is known).
	SyncInterval time.Duration
}

// Status returns the syncer's current status.
func (s *Syncer) Status() Status {
	pending, since := s.State.Pending()
	s.mu.Lock()
	defer s.mu.Unlock()
	st := Status{Synced: s.firstSynced, LastSuccess: s.lastSuccess, PendingSince: s.pendingSince,
		ConfigGeneration: s.appliedConfig, LastError: s.lastErr}
	if pending > 0 && (st.PendingSince.IsZero() || since.Before(st.PendingSince)) {
		st.PendingSince = since
	}
	if s.config != nil {
		st.SyncInterval = s.config.Spec.SyncInterval.Duration
	}
	return st
}

// Healthy fails when the rules are stale: changes are pending and no
// write has succeeded for longer than twice the sync interval.
func (s *Syncer) Healthy(now time.Time) error {
	st := s.Status()
	if st.SyncInterval == 0 || st.PendingSince.IsZero() {
		return nil
	}
	if age := now.Sub(st.LastSuccess); age > 2*st.SyncInterval {
		msg := fmt.Sprintf("rules are stale: changes pending since %s and no successful sync for %s (limit %s)",
			st.PendingSince.Format(time.RFC3339), age.Round(time.Second), 2*st.SyncInterval)
		if st.LastError != nil {
			return fmt.Errorf("%s; last error: %w", msg, st.LastError)
		}
		return errors.New(msg)
	}
	return nil
}

// ReadyCheck fails until the first full sync has been written.
func (s *Syncer) ReadyCheck() error {
	if !s.Status().Synced {
		return errors.New("the first sync has not been written yet")
	}
	return nil
}
