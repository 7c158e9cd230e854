package main

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/dataplane"
)

// measureDatapath times new connections (connect, one request, answer,
// close) through sampled ClusterIPs and straight to the pods, in
// alternating blocks so that drift on a shared machine hits both alike.
// The first block of each is a warm-up and is not kept.
func measureDatapath(ctx context.Context, p *prober, sample []int, samples int, r *scaleResult) error {
	const block = 100
	vip, pod := 0, 0
	for done := -block; done < samples; done += block {
		if err := ctx.Err(); err != nil {
			return err
		}
		for range block {
			res := p.probe(clusterIPAddr(sample[vip%len(sample)]), time.Second)
			vip++
			if res.err != nil {
				r.DatapathErrors++
			} else if done >= 0 {
				r.ClusterIP = append(r.ClusterIP, res.took)
			}
		}
		for range block {
			res := p.probe(netip.AddrPortFrom(podIP(pod%endpointsPerService), podPort), time.Second)
			pod++
			if res.err != nil {
				r.DatapathErrors++
			} else if done >= 0 {
				r.Direct = append(r.Direct, res.took)
			}
		}
	}
	if r.DatapathErrors > samples/100 {
		return fmt.Errorf("datapath: %d of %d connections failed", r.DatapathErrors, 2*(samples+block))
	}
	return nil
}

// measureChanges makes Changes changes of each kind, one at a time, each
// further than minSyncInterval from the agent's previous write so that
// none waits on the rate limit, and times each from its API write
// returning to the change being visible in traffic:
//
//   - new Service: its EndpointSlice is written first (and given time
//     to be absorbed), then the Service; visible at the start of the
//     first connection to its ClusterIP that a pod answers.
//   - endpoint added: a fifth pod is added to a Service's slice (one
//     patch); visible at the start of the first connection the new pod
//     answers.
//   - endpoint removed: that pod is removed again; visible at the start
//     of the first of removalRun consecutive connections none of which
//     reaches it.
//
// Connections follow each other back to back (probePause apart), so the
// figures include up to one connection's time (~0.3 ms) of probing.
func (h *harness) measureChanges(ctx context.Context, agent *agentProcess, p *prober, n int, r *scaleResult) error {
	for _, k := range changeKinds {
		r.Changes[k] = &changeResult{}
	}
	spacing := h.opts.MinSyncInterval
	if spacing < 0 {
		spacing = defaultMinSyncInterval
	}
	spacing += 200 * time.Millisecond
	// pause waits until the agent is quiet: nothing pending, no write
	// for spacing, no CPU to speak of. A change made earlier would wait
	// on minSyncInterval or behind a sync in progress.
	pause := func() error {
		_, err := waitQuiet(ctx, agent, spacing, time.Minute)
		return err
	}
	// record keeps a change's latency from its write returning and
	// from its request being sent, the API server's part included.
	record := func(kind string, sent, written, visible time.Time) {
		if h.opts.Verbose {
			h.opts.Log("%d Services: %s: %v after the write returned, %v after the request (visible %v)",
				n, kind, visible.Sub(written), visible.Sub(sent), !visible.IsZero())
		}
		c := r.Changes[kind]
		if visible.IsZero() {
			c.Failed++
			return
		}
		c.Latencies = append(c.Latencies, visible.Sub(written))
		c.FromRequest = append(c.FromRequest, visible.Sub(sent))
		if b, err := agent.lastBatch(ctx); err == nil {
			c.Batches = append(c.Batches, b)
		}
	}
	// After its first write the agent still works through the initial
	// events of every object (each reconcile marks a Service changed, and
	// the syncer recomputes them, a minSyncInterval apart): how long that
	// lasts is a figure of its own.
	settled, err := waitQuiet(ctx, agent, spacing, 3*time.Minute)
	if err != nil {
		return err
	}
	r.SettleAfterColdStart = settled
	var added []types.NamespacedName
	defer func() {
		for _, key := range added {
			_ = h.cluster.deleteService(context.Background(), key)
		}
	}()
	// Services to change, spread over the whole range.
	stride := max(n/h.opts.Changes, 1)
	for k := range h.opts.Changes {
		// A new Service.
		key := types.NamespacedName{Namespace: serviceKey(k).Namespace, Name: fmt.Sprintf("new-%d-%d", n, k)}
		ip := addrAdd(newServiceBase, len(h.newServices))
		h.newServices = append(h.newServices, key)
		if err := h.cluster.createSlice(ctx, key, basePods()); err != nil {
			return err
		}
		added = append(added, key)
		if err := pause(); err != nil {
			return err
		}
		sent := time.Now()
		if _, err := h.cluster.clientset.CoreV1().Services(key.Namespace).Create(ctx, service(key, ip), metav1.CreateOptions{}); err != nil {
			return fmt.Errorf("creating Service %s: %w", key, err)
		}
		written := time.Now()
		visible := waitVisible(ctx, p, netip.AddrPortFrom(ip, servicePort), written, func(server string) bool { return server != "" })
		record(kindNewService, sent, written, visible)
		if err := pause(); err != nil {
			return err
		}

		// An endpoint added to, then removed from, an existing Service.
		i := (k*stride + stride/2) % n
		target := clusterIPAddr(i)
		spare := fmt.Sprintf("pod%d", endpointsPerService)
		sent = time.Now()
		if err := h.cluster.setEndpoints(ctx, serviceKey(i), append(basePods(), endpointsPerService)); err != nil {
			return err
		}
		written = time.Now()
		visible = waitVisible(ctx, p, target, written, func(server string) bool { return server == spare })
		record(kindEndpointAdded, sent, written, visible)
		if err := pause(); err != nil {
			return err
		}
		sent = time.Now()
		if err := h.cluster.setEndpoints(ctx, serviceKey(i), basePods()); err != nil {
			return err
		}
		written = time.Now()
		visible = waitGone(ctx, p, target, written, spare)
		record(kindEndpointRemoved, sent, written, visible)
		if err := pause(); err != nil {
			return err
		}
	}
	return nil
}

// waitVisible probes addr until an answer satisfies want and returns
// the start of that connection; zero if none within changeTimeout.
func waitVisible(ctx context.Context, p *prober, addr netip.AddrPort, written time.Time, want func(server string) bool) time.Time {
	for time.Since(written) < changeTimeout && ctx.Err() == nil {
		res := p.probe(addr, probeTimeout)
		if res.err == nil && want(res.server) {
			return res.start
		}
		time.Sleep(probePause)
	}
	return time.Time{}
}

// waitGone probes addr until removalRun answers in a row come from
// servers other than gone, and returns the start of the first
// connection of that run; zero if none within changeTimeout.
func waitGone(ctx context.Context, p *prober, addr netip.AddrPort, written time.Time, gone string) time.Time {
	var runStart time.Time
	streak := 0
	for time.Since(written) < changeTimeout && ctx.Err() == nil {
		res := p.probe(addr, probeTimeout)
		switch {
		case res.err != nil || res.server == gone:
			streak = 0
		case streak == 0:
			runStart, streak = res.start, 1
		default:
			streak++
		}
		if streak >= removalRun {
			return runStart
		}
		time.Sleep(probePause)
	}
	return time.Time{}
}

// replayColdStart repeats the agent's cold start in the harness, timing
// each part on its own: the list of every Service and slice from the API
// server, the compute of the ruleset, and its first write into an empty
// namespace (a scratch one next to the topology's, deleted after).
func replayColdStart(ctx context.Context, c *cluster, tp *topology) (inProcess, error) {
	var out inProcess
	start := time.Now()
	var services corev1.ServiceList
	if err := c.client.List(ctx, &services); err != nil {
		return out, fmt.Errorf("listing Services: %w", err)
	}
	var slices discoveryv1.EndpointSliceList
	if err := c.client.List(ctx, &slices); err != nil {
		return out, fmt.Errorf("listing EndpointSlices: %w", err)
	}
	out.List = time.Since(start)

	snap := &dataplane.Snapshot{NodeName: nodeName, Services: map[types.NamespacedName]dataplane.ServiceState{}}
	snap.Config.Default()
	byService := map[types.NamespacedName][]*discoveryv1.EndpointSlice{}
	for i := range slices.Items {
		sl := &slices.Items[i]
		key := types.NamespacedName{Namespace: sl.Namespace, Name: sl.Labels[discoveryv1.LabelServiceName]}
		byService[key] = append(byService[key], sl)
	}
	for i := range services.Items {
		svc := &services.Items[i]
		key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
		snap.Services[key] = dataplane.ServiceState{Service: svc, Slices: byService[key]}
	}
	runtime.GC() // the lists' garbage is not the compute's cost
	start = time.Now()
	rs := dataplane.NewComputer().Compute(snap)
	out.Compute = time.Since(start)

	scratch := strings.TrimSuffix(tp.node, "-node") + "-scratch"
	if err := run(ctx, "ip", "netns", "add", scratch); err != nil {
		return out, err
	}
	defer func() {
		if err := run(context.Background(), "ip", "netns", "del", scratch); err != nil {
			fmt.Fprintln(os.Stderr, "bench:", err)
		}
	}()
	k, err := dataplane.NewKernelApplier(dataplane.WithNetNS(netnsDir + "/" + scratch))
	if err != nil {
		return out, err
	}
	defer func() { _ = k.Close() }()
	start = time.Now()
	if err := k.Replace(ctx, rs); err != nil {
		return out, fmt.Errorf("writing the replayed ruleset: %w", err)
	}
	out.Write = time.Since(start)
	st := k.LastBatch()
	out.Batch = batch{Bytes: st.Bytes, Messages: st.Messages}
	return out, nil
}

// waitQuiet waits, at most limit, until the agent has been quiet for
// window: nothing pending, no write, and under 10% of a core of CPU (a
// sync in progress takes a whole core; each poll of /metrics costs the
// agent a few milliseconds, hence the slow polling). It returns how long
// it waited.
func waitQuiet(ctx context.Context, agent *agentProcess, window, limit time.Duration) (time.Duration, error) {
	start := time.Now()
	type sample struct {
		at       time.Time
		lastSync float64
		cpu      float64
	}
	var history []sample
	for {
		m, err := agent.metrics(ctx)
		if err != nil {
			return 0, err
		}
		u, err := agent.usage()
		if err != nil {
			return 0, err
		}
		now := sample{time.Now(), m["nftproxy_sync_proxy_rules_last_timestamp_seconds"], u.CPUSeconds}
		if m["nftproxy_sync_proxy_rules_service_changes_pending"] != 0 {
			history = nil
		}
		history = append(history, now)
		if old := history[0]; now.at.Sub(old.at) >= window {
			lastSync := time.Unix(0, int64(now.lastSync*1e9))
			if now.lastSync == old.lastSync && now.at.Sub(lastSync) >= window &&
				now.cpu-old.cpu < 0.1*now.at.Sub(old.at).Seconds() {
				return time.Since(start), nil
			}
			history = history[1:]
		}
		if time.Since(start) > limit {
			return 0, fmt.Errorf("the agent was not quiet for %v within %v", window, limit)
		}
		select {
		case <-ctx.Done():
			return 0, ctx.Err()
		case <-time.After(250 * time.Millisecond):
		}
	}
}
