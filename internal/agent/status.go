package agent

import (
	"context"
	"fmt"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/go-logr/logr"
	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// How agents report, and how the leader sums the reports up.
//
// Each agent keeps one Lease of its own, nftproxy-node-<node>, in the
// agent's namespace: which ProxyConfig and generation its node runs and,
// when its writes fail, why. It writes the Lease when that changes and
// renews it every reportRenewal, so 5,000 nodes cost about 17 small
// writes a second, a fraction of what kubelets spend on their own node
// Leases; no agent watches another's. The one elected agent lists those
// Leases (from the API server's watch cache) every statusPeriod and writes
// the ProxyConfig's status only when the summary changed: one writer per
// object, at most one write per period.
const (
	reportRenewal = 5 * time.Minute
	// reportExpiry is when a Lease not renewed stops counting: its agent
	// is gone (a Node's Lease is also deleted with the Node it is owned by).
	reportExpiry    = 3 * reportRenewal
	statusPeriod    = 30 * time.Second
	reportPoll      = 2 * time.Second
	reportLabel     = "proxy.nftproxy.io/node-report"
	configAnno      = "proxy.nftproxy.io/config"
	generationAnno  = "proxy.nftproxy.io/generation"
	degradedAnno    = "proxy.nftproxy.io/degraded"
	maxDegradedText = 512
)

// nodeReport is what one agent says of itself.
type nodeReport struct {
	config     string
	generation int64
	degraded   string // why the node's rules are not as they should be; "" if they are
}

// reportOf is the report the syncer's status makes.
func reportOf(config string, st Status, healthy error) nodeReport {
	r := nodeReport{config: config, generation: st.ConfigGeneration}
	switch {
	case st.LastError != nil:
		r.degraded = "the last write to the kernel failed: " + st.LastError.Error()
	case healthy != nil:
		r.degraded = healthy.Error()
	case !st.Synced:
		r.degraded = "not synced yet"
	}
	if len(r.degraded) > maxDegradedText {
		r.degraded = r.degraded[:maxDegradedText] + "..."
	}
	return r
}

// nodeReporter keeps this agent's Lease in step with its syncer. Every
// agent runs one.
type nodeReporter struct {
	client client.Client
	// reader reads the node's own Lease, uncached: a cached read would
	// make the agent watch every Lease in the cluster (one per node in
	// kube-node-lease alone), which its RBAC rightly forbids.
	reader    client.Reader
	namespace string
	node      string
	config    string
	syncer    *Syncer
	log       logr.Logger
	// poll is how often the syncer's status is looked at (in process).
	poll time.Duration
}

func (r *nodeReporter) leaseName() string { return "nftproxy-node-" + r.node }

// NeedLeaderElection is false: every agent reports itself.
func (r *nodeReporter) NeedLeaderElection() bool { return false }

// Start reports until ctx ends (manager.Runnable).
func (r *nodeReporter) Start(ctx context.Context) error {
	var written nodeReport
	var writtenAt, retryAt time.Time
	failures := 0
	tick := time.NewTicker(r.poll)
	defer tick.Stop()
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
		if time.Now().Before(retryAt) {
			continue
		}
		st := r.syncer.Status()
		if !st.Synced && st.LastError == nil {
			continue // nothing to say before the first write
		}
		report := reportOf(r.config, st, r.syncer.Healthy(time.Now()))
		if report == written && time.Since(writtenAt) < reportRenewal {
			continue
		}
		if err := r.write(ctx, report); err != nil {
			backoff := min(r.poll<<min(failures, 8), reportRenewal)
			failures++
			retryAt = time.Now().Add(backoff)
			r.log.Info("Writing this node's report failed; retrying", "error", err.Error(), "in", backoff.String())
			continue
		}
		written, writtenAt, failures = report, time.Now(), 0
	}
}

func (r *nodeReporter) write(ctx context.Context, report nodeReport) error {
	now := metav1.NewMicroTime(time.Now())
	lease := &coordinationv1.Lease{}
	err := r.reader.Get(ctx, client.ObjectKey{Namespace: r.namespace, Name: r.leaseName()}, lease)
	create := apierrors.IsNotFound(err)
	if err != nil && !create {
		return err
	}
	lease.Namespace, lease.Name = r.namespace, r.leaseName()
	if lease.Labels == nil {
		lease.Labels = map[string]string{}
	}
	lease.Labels[reportLabel] = "true"
	if lease.Annotations == nil {
		lease.Annotations = map[string]string{}
	}
	lease.Annotations[configAnno] = report.config
	lease.Annotations[generationAnno] = strconv.FormatInt(report.generation, 10)
	if report.degraded != "" {
		lease.Annotations[degradedAnno] = report.degraded
	} else {
		delete(lease.Annotations, degradedAnno)
	}
	lease.Spec.HolderIdentity = ptr.To(r.node)
	lease.Spec.LeaseDurationSeconds = ptr.To(int32(reportExpiry / time.Second))
	lease.Spec.RenewTime = &now
	// Owned by the Node, so that it goes away with it.
	var node corev1.Node
	if err := r.client.Get(ctx, client.ObjectKey{Name: r.node}, &node); err == nil {
		lease.OwnerReferences = []metav1.OwnerReference{{APIVersion: "v1", Kind: "Node", Name: node.Name, UID: node.UID}}
	}
	if create {
		return r.client.Create(ctx, lease)
	}
	return r.client.Update(ctx, lease)
}

// statusWriter is the elected agent's: it sums up the node reports of its
// ProxyConfig into the ProxyConfig's status.
type statusWriter struct {
	client    client.Client
	reader    client.Reader // uncached: only the leader lists the reports
	namespace string
	config    string
	period    time.Duration
	log       logr.Logger
}

// Start writes status until ctx ends: while this agent leads (a leader
// duty).
func (w *statusWriter) Start(ctx context.Context) error {
	tick := time.NewTicker(w.period)
	defer tick.Stop()
	for {
		if err := w.update(ctx); err != nil && ctx.Err() == nil {
			w.log.Error(err, "Updating the ProxyConfig status failed; retrying", "proxyConfig", w.config)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-tick.C:
		}
	}
}

func (w *statusWriter) update(ctx context.Context) error {
	var pc proxyv1alpha1.ProxyConfig
	if err := w.client.Get(ctx, client.ObjectKey{Name: w.config}, &pc); err != nil {
		return client.IgnoreNotFound(err)
	}
	var leases coordinationv1.LeaseList
	if err := w.reader.List(ctx, &leases, client.InNamespace(w.namespace), client.MatchingLabels{reportLabel: "true"},
		&client.ListOptions{Raw: &metav1.ListOptions{ResourceVersion: "0"}}); err != nil {
		return fmt.Errorf("listing node reports: %w", err)
	}
	status := summarize(&pc, leases.Items, time.Now())
	if equality.Semantic.DeepEqual(status, pc.Status) {
		return nil
	}
	pc.Status = status
	return w.client.Status().Update(ctx, &pc)
}

// summarize computes a ProxyConfig's status from the node reports; the
// conditions keep their transition times when their status stays.
func summarize(pc *proxyv1alpha1.ProxyConfig, leases []coordinationv1.Lease, now time.Time) proxyv1alpha1.ProxyConfigStatus {
	status := proxyv1alpha1.ProxyConfigStatus{Conditions: slices.Clone(pc.Status.Conditions)}
	var degraded []string
	for _, l := range leases {
		if l.Annotations[configAnno] != pc.Name || l.Spec.RenewTime == nil || now.Sub(l.Spec.RenewTime.Time) > reportExpiry {
			continue
		}
		status.Nodes.Total++
		gen, _ := strconv.ParseInt(l.Annotations[generationAnno], 10, 64)
		why, bad := l.Annotations[degradedAnno]
		if bad {
			status.Nodes.Degraded++
			degraded = append(degraded, fmt.Sprintf("%s: %s", ptr.Deref(l.Spec.HolderIdentity, l.Name), why))
		} else if gen == pc.Generation {
			status.Nodes.Current++
		}
	}

	accepted := metav1.Condition{Type: proxyv1alpha1.ConditionAccepted, ObservedGeneration: pc.Generation,
		Status: metav1.ConditionTrue, Reason: "Valid", Message: "The agents can use this generation."}
	spec := *pc.Spec.DeepCopy()
	spec.Default()
	if err := spec.Validate(); err != nil {
		accepted.Status, accepted.Reason = metav1.ConditionFalse, "Invalid"
		accepted.Message = "The agents keep their previous configuration: " + err.Error()
	}
	meta.SetStatusCondition(&status.Conditions, accepted)

	cond := metav1.Condition{Type: proxyv1alpha1.ConditionDegraded, ObservedGeneration: pc.Generation,
		Status: metav1.ConditionFalse, Reason: "AllNodesProgrammed",
		Message: fmt.Sprintf("%d of %d nodes run generation %d.", status.Nodes.Current, status.Nodes.Total, pc.Generation)}
	if len(degraded) > 0 {
		slices.Sort(degraded)
		shown := degraded[:min(len(degraded), 3)]
		cond.Status, cond.Reason = metav1.ConditionTrue, "NodesFailing"
		cond.Message = fmt.Sprintf("%d of %d nodes cannot program their rules: %s", len(degraded), status.Nodes.Total, strings.Join(shown, "; "))
		if len(degraded) > len(shown) {
			cond.Message += "; ..."
		}
	}
	meta.SetStatusCondition(&status.Conditions, cond)
	return status
}
