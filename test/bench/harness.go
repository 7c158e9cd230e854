package main

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/internal/netns"
)

// options are the harness's knobs; main fills them from flags, the smoke
// test with tiny values.
type options struct {
	Scales []int // Services per scale, ascending
	// BaselineScale is measured first, for cold start, datapath and
	// resources only: the "100 Services" the datapath aim compares with.
	BaselineScale int
	Changes       int // changes of each kind per scale
	// DatapathSamples is the number of connections per path and scale.
	DatapathSamples int
	// ProbeSample is how many ClusterIPs the cold start waits for.
	ProbeSample int
	// MinSyncInterval goes into the ProxyConfig; negative leaves the
	// ProxyConfig absent, so the agent runs with the defaults (1s).
	MinSyncInterval time.Duration
	Agent           string // the nftproxy binary; built when empty
	// KeepLogs copies the agents' logs into this directory.
	KeepLogs string
	Log      func(format string, args ...any) `json:"-"`
	// Verbose logs every change's latency.
	Verbose bool
}

// defaultMinSyncInterval is the ProxyConfig default: changes closer than
// this are coalesced, so the change benchmark spaces its changes further
// apart than it.
const defaultMinSyncInterval = time.Second

// results is one run of the harness.
type results struct {
	Machine machine
	Options options
	Scales  []scaleResult
	Took    time.Duration
}

// scaleResult is everything measured at one number of Services.
type scaleResult struct {
	Services        int
	Baseline        bool
	CreateTook      time.Duration // writing the Services added for this scale
	CreatedObjects  int           // Services + slices written for it
	ColdStart       time.Duration // agent start to every sampled ClusterIP answering
	ColdFirstAnswer time.Duration // ... to the first one answering
	Ready           time.Duration // agent start to /readyz passing
	Timeline        logTimeline
	ColdCPUSeconds  float64
	ColdBatch       batch
	InProcess       inProcess
	Changes         map[string]*changeResult
	// SettleAfterColdStart is how long after the cold start the agent
	// kept writing, working through the initial events.
	SettleAfterColdStart time.Duration
	ClusterIP            []time.Duration
	Direct               []time.Duration
	DatapathErrors       int
	Usage                usage
	AgentLogFile         string
	ProbedClusterIPs     int
}

// inProcess is the agent's cold start replayed in the harness, one part
// at a time, on the same objects: where the time goes.
type inProcess struct {
	List    time.Duration // listing every Service and slice from the API server
	Compute time.Duration // the ruleset from the snapshot (dataplane.Computer)
	Write   time.Duration // the first write (Replace) into an empty namespace
	Batch   batch
}

// changeResult are the latencies of one kind of change at one scale.
type changeResult struct {
	Latencies []time.Duration // from the API write returning
	// FromRequest are the same from the request being sent: the API
	// server's response can reach the writer after its watch event has
	// reached the agent and the agent has programmed the change.
	FromRequest []time.Duration
	Batches     []batch
	Failed      int // never became visible within changeTimeout
}

const (
	kindNewService      = "new Service"
	kindEndpointAdded   = "endpoint added"
	kindEndpointRemoved = "endpoint removed"
)

var changeKinds = []string{kindNewService, kindEndpointAdded, kindEndpointRemoved}

const (
	coldStartTimeout = 3 * time.Minute
	changeTimeout    = 10 * time.Second
	probeTimeout     = 250 * time.Millisecond
	// removalRun is how many consecutive connections must all miss a
	// removed endpoint for the removal to count as visible; with one
	// endpoint in five, a run this long happens by chance before the
	// change (0.8^30) about once in a thousand removals.
	removalRun = 30
	// probePause leaves the agent a core while a probe loop spins.
	probePause = 200 * time.Microsecond
)

// harness holds what lives across scales.
type harness struct {
	opts    options
	dir     string
	cluster *cluster
	agent   string
	// newServices are the Services the change benchmark created, over
	// all scales: each gets a ClusterIP never used before.
	newServices []types.NamespacedName
}

func runHarness(ctx context.Context, opts options) (*results, error) {
	start := time.Now()
	if opts.Log == nil {
		opts.Log = func(string, ...any) {}
	}
	if n := netns.SweepStale(benchNSName); n > 0 {
		opts.Log("removed %d namespaces left by a killed harness", n)
	}
	dir, err := os.MkdirTemp("", "nftproxy-bench-")
	if err != nil {
		return nil, err
	}
	defer func() { _ = os.RemoveAll(dir) }()
	h := &harness{opts: opts, dir: dir, agent: opts.Agent}
	if h.agent == "" {
		opts.Log("building the agent")
		if h.agent, err = buildAgent(ctx, repoRoot(), dir); err != nil {
			return nil, err
		}
	}
	opts.Log("starting kube-apiserver and etcd")
	if h.cluster, err = startCluster(ctx, dir, opts.MinSyncInterval); err != nil {
		return nil, err
	}
	defer h.cluster.stop()

	res := &results{Machine: describeMachine(), Options: opts}
	defer func() { res.Took = time.Since(start) }()
	scales := opts.Scales
	if opts.BaselineScale > 0 && len(scales) > 0 && opts.BaselineScale >= scales[0] {
		opts.BaselineScale = 0 // the first scale is small enough to compare with
	}
	if opts.BaselineScale > 0 {
		scales = append([]int{opts.BaselineScale}, scales...)
	}
	for i, n := range scales {
		baseline := opts.BaselineScale > 0 && i == 0
		r, err := h.measureScale(ctx, n, baseline)
		if err != nil {
			return res, fmt.Errorf("at %d Services: %w", n, err)
		}
		res.Scales = append(res.Scales, *r)
	}
	return res, nil
}

func (h *harness) measureScale(ctx context.Context, n int, baseline bool) (*scaleResult, error) {
	log := h.opts.Log
	r := &scaleResult{Services: n, Baseline: baseline, Changes: map[string]*changeResult{}}
	before := h.cluster.created
	log("%d Services: creating %d Services and their EndpointSlices", n, max(n-before, 0))
	took, err := h.cluster.ensureServices(ctx, n)
	if err != nil {
		return nil, err
	}
	r.CreateTook, r.CreatedObjects = took, 2*max(n-before, 0)
	if r.CreatedObjects > 0 {
		log("%d Services: created %d objects in %v (%.0f/s)", n, r.CreatedObjects, took.Round(time.Millisecond),
			float64(r.CreatedObjects)/took.Seconds())
	}

	// A fresh network for every agent start: an empty kernel, no
	// conntrack entries from the scale before.
	tp, err := newTopology(ctx, endpointsPerService+1)
	if err != nil {
		return nil, err
	}
	defer tp.close()
	p, err := newProber(tp.client)
	if err != nil {
		return nil, err
	}
	defer p.close()

	logDir := h.dir
	if h.opts.KeepLogs != "" {
		logDir = h.opts.KeepLogs
		if err := os.MkdirAll(logDir, 0o755); err != nil {
			return nil, err
		}
	}
	r.AgentLogFile = filepath.Join(logDir, fmt.Sprintf("agent-%d.log", n))
	agent, err := startAgent(h.agent, h.cluster.kubeconfig, tp.nodePath(), r.AgentLogFile)
	if err != nil {
		return nil, err
	}
	defer agent.stop()
	sample := sampleServices(n, h.opts.ProbeSample)
	r.ProbedClusterIPs = len(sample)
	if err := h.coldStart(ctx, agent, tp, sample, r); err != nil {
		return nil, err
	}
	log("%d Services: cold start %v (ready %v)", n, r.ColdStart.Round(time.Millisecond), r.Ready.Round(time.Millisecond))

	log("%d Services: datapath, %d connections per path", n, h.opts.DatapathSamples)
	if err := measureDatapath(ctx, p, sample, h.opts.DatapathSamples, r); err != nil {
		return nil, err
	}
	if !baseline && h.opts.Changes > 0 {
		log("%d Services: %d changes of each kind", n, h.opts.Changes)
		if err := h.measureChanges(ctx, agent, p, n, r); err != nil {
			return nil, err
		}
	}
	if err := agent.alive(); err != nil {
		return nil, err
	}
	if r.Usage, err = agent.usage(); err != nil {
		return nil, err
	}
	agent.stop()
	if r.Timeline, err = agent.timeline(); err != nil {
		return nil, fmt.Errorf("%w (log %s)", err, r.AgentLogFile)
	}
	log("%d Services: replaying the cold start in the harness", n)
	if r.InProcess, err = replayColdStart(ctx, h.cluster, tp); err != nil {
		return nil, err
	}
	return r, nil
}

// sampleServices picks the ClusterIPs the cold start waits for: the
// first and the last created (those the agent's list returns last), and
// an even spread between.
func sampleServices(n, want int) []int {
	if want >= n {
		out := make([]int, n)
		for i := range out {
			out[i] = i
		}
		return out
	}
	seen := map[int]bool{}
	var out []int
	add := func(i int) {
		if !seen[i] {
			seen[i] = true
			out = append(out, i)
		}
	}
	edge := want / 4
	for i := range edge {
		add(i)
		add(n - 1 - i)
	}
	rng := rand.New(rand.NewPCG(uint64(n), 7))
	for len(out) < want {
		add(rng.IntN(n))
	}
	slices.Sort(out)
	return out
}

func clusterIPAddr(i int) netip.AddrPort { return netip.AddrPortFrom(serviceIP(i), servicePort) }

// coldStart waits until every sampled ClusterIP answers, probing each
// until it does; the time of a ClusterIP is the start of its first
// answered connection.
func (h *harness) coldStart(ctx context.Context, agent *agentProcess, tp *topology, sample []int, r *scaleResult) error {
	readyAt := make(chan time.Duration, 1)
	readyCtx, stopReady := context.WithCancel(ctx)
	defer stopReady()
	go func() {
		for readyCtx.Err() == nil {
			if agent.ready() {
				readyAt <- time.Since(agent.started)
				return
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()

	// Two probers: a round over hundreds of unreachable ClusterIPs takes
	// tens of milliseconds, which would otherwise blur the figure.
	probers := []*prober{}
	for range 2 {
		p, err := newProber(tp.client)
		if err != nil {
			return err
		}
		defer p.close()
		probers = append(probers, p)
	}
	pending := slices.Clone(sample)
	deadline := agent.started.Add(coldStartTimeout)
	var first, last time.Time
	for len(pending) > 0 {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := agent.alive(); err != nil {
			return err
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cold start: %d of %d sampled ClusterIPs (e.g. %s) still not answering after %v",
				len(pending), len(sample), clusterIPAddr(pending[0]), coldStartTimeout)
		}
		// Each prober takes every len(probers)-th pending ClusterIP and
		// notes when its answered connections started.
		answeredAt := make([]time.Time, len(pending))
		done := make(chan struct{})
		for w, p := range probers {
			go func() {
				defer func() { done <- struct{}{} }()
				for j := w; j < len(pending); j += len(probers) {
					if res := p.probe(clusterIPAddr(pending[j]), probeTimeout); res.err == nil {
						answeredAt[j] = res.start
					}
				}
			}()
		}
		for range probers {
			<-done
		}
		var still []int
		for j, i := range pending {
			at := answeredAt[j]
			if at.IsZero() {
				still = append(still, i)
				continue
			}
			if at.After(last) {
				last = at
			}
			if first.IsZero() || at.Before(first) {
				first = at
			}
		}
		pending = still
		if len(pending) > 0 {
			time.Sleep(5 * time.Millisecond)
		}
	}
	u, err := agent.usage()
	if err != nil {
		return err
	}
	r.ColdCPUSeconds = u.CPUSeconds
	r.ColdStart, r.ColdFirstAnswer = last.Sub(agent.started), first.Sub(agent.started)
	select {
	case d := <-readyAt:
		r.Ready = d
	case <-time.After(30 * time.Second):
		return errors.New("/readyz did not pass within 30s of every ClusterIP answering")
	case <-ctx.Done():
		return ctx.Err()
	}
	r.ColdBatch, err = agent.lastBatch(ctx)
	return err
}
