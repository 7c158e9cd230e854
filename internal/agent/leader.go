package agent

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/util/uuid"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// The lease timings are controller-runtime's defaults.
const (
	leaseDuration = 15 * time.Second
	renewDeadline = 10 * time.Second
	retryPeriod   = 2 * time.Second
)

// leaderDuties elects, among the agents of one ProxyConfig, the one that
// writes its status and Service Events, and runs those duties while it
// leads. It is the agent's own election, not the manager's: the manager's
// ends the process when the lease cannot be renewed for renewDeadline (an
// API server away for ten seconds), and a node's proxy must go on
// programming its node through that. Losing the lease stops only the
// duties; the agent then campaigns again.
type leaderDuties struct {
	lock    resourcelock.Interface // nil: no election, this agent always leads
	duties  []func(context.Context) error
	leading atomic.Int32 // terms running: a lost term's duties may still be ending as the next one starts
	log     logr.Logger
}

// newLeaderDuties campaigns for the Lease namespace/name when elect is
// set; otherwise the agent leads at once.
func newLeaderDuties(cfg *rest.Config, elect bool, namespace, name, node string, log logr.Logger) (*leaderDuties, error) {
	l := &leaderDuties{log: log}
	if !elect {
		return l, nil
	}
	host, err := os.Hostname()
	if err != nil {
		host = node
	}
	lock, err := resourcelock.NewFromKubeconfig(resourcelock.LeasesResourceLock, namespace, name,
		resourcelock.ResourceLockConfig{Identity: fmt.Sprintf("%s_%s_%s", node, host, uuid.NewUUID())}, cfg, renewDeadline)
	if err != nil {
		return nil, fmt.Errorf("leader election lock: %w", err)
	}
	l.lock = lock
	return l, nil
}

// add registers a duty: run while leading, with a context that ends when
// the lead does.
func (l *leaderDuties) add(duty func(context.Context) error) { l.duties = append(l.duties, duty) }

// Leading reports whether this agent leads now.
func (l *leaderDuties) Leading() bool { return l.leading.Load() > 0 }

// NeedLeaderElection is false: the election is this runnable's own.
func (l *leaderDuties) NeedLeaderElection() bool { return false }

// Start campaigns, leads and campaigns again until ctx ends
// (manager.Runnable).
func (l *leaderDuties) Start(ctx context.Context) error {
	if l.lock == nil {
		l.lead(ctx)
		return nil
	}
	for ctx.Err() == nil {
		elector, err := leaderelection.NewLeaderElector(leaderelection.LeaderElectionConfig{
			Lock:            l.lock,
			LeaseDuration:   leaseDuration,
			RenewDeadline:   renewDeadline,
			RetryPeriod:     retryPeriod,
			ReleaseOnCancel: true, // the rules stay; a successor may take over at once
			Name:            l.lock.Describe(),
			Callbacks: leaderelection.LeaderCallbacks{
				OnStartedLeading: l.lead,
				OnStoppedLeading: func() {},
			},
		})
		if err != nil {
			return err
		}
		elector.Run(ctx) // returns when the lead is lost, or ctx ends
		if ctx.Err() == nil {
			l.log.Info("Lost the lead (status and Events stop here); campaigning again", "lease", l.lock.Describe())
			select {
			case <-ctx.Done():
			case <-time.After(retryPeriod):
			}
		}
	}
	return nil
}

// lead runs every duty until ctx ends.
func (l *leaderDuties) lead(ctx context.Context) {
	l.leading.Add(1)
	defer l.leading.Add(-1)
	if l.lock != nil {
		l.log.Info("Leading: writing ProxyConfig status and Service Events", "lease", l.lock.Describe())
	}
	var wg sync.WaitGroup
	for _, duty := range l.duties {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := duty(ctx); err != nil && ctx.Err() == nil {
				l.log.Error(err, "A leader duty failed")
			}
		}()
	}
	<-ctx.Done()
	wg.Wait()
}
