package agent

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// TestProxyConfigStatus: two agents of one ProxyConfig report themselves
// in Leases; the elected one writes Accepted, Degraded and node counts
// with the generation they are for.
func TestProxyConfigStatus(t *testing.T) {
	ns := createNamespace(t)
	withStatus := func(node string) func(*Options) {
		return func(o *Options) {
			o.NodeName = node
			o.ConfigName = "config-status"
			o.StatusNamespace = ns
			o.StatusPeriod = 300 * time.Millisecond
			o.LeaderElection = true
			o.LeaderElectionNamespace = ns
		}
	}
	a := startAgent(t, withStatus("node-status-a"))
	b := startAgent(t, withStatus("node-status-b"))
	for _, name := range []string{a.node, b.node} {
		create(t, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: name}})
	}
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "config-status"}}
	create(t, pc)

	ctx := context.Background()
	statusIs := func(what string, check func(st proxyv1alpha1.ProxyConfigStatus, generation int64) error) {
		t.Helper()
		waitFor(t, 30*time.Second, what, func() error {
			var got proxyv1alpha1.ProxyConfig
			if err := apiClient.Get(ctx, client.ObjectKeyFromObject(pc), &got); err != nil {
				return err
			}
			return check(got.Status, got.Generation)
		})
	}
	condition := func(st proxyv1alpha1.ProxyConfigStatus, typ string, status metav1.ConditionStatus, generation int64) error {
		c := meta.FindStatusCondition(st.Conditions, typ)
		if c == nil || c.Status != status || c.ObservedGeneration != generation {
			return fmt.Errorf("%s condition %+v, want %s for generation %d", typ, c, status, generation)
		}
		return nil
	}
	statusIs("both nodes current", func(st proxyv1alpha1.ProxyConfigStatus, gen int64) error {
		if st.Nodes != (proxyv1alpha1.NodeSummary{Total: 2, Current: 2}) {
			return fmt.Errorf("nodes %+v", st.Nodes)
		}
		return errors.Join(condition(st, proxyv1alpha1.ConditionAccepted, metav1.ConditionTrue, gen),
			condition(st, proxyv1alpha1.ConditionDegraded, metav1.ConditionFalse, gen))
	})

	// The node reports are Leases owned by their Nodes.
	var lease coordinationv1.Lease
	if err := apiClient.Get(ctx, client.ObjectKey{Namespace: ns, Name: "nftproxy-node-" + a.node}, &lease); err != nil {
		t.Fatal(err)
	}
	if len(lease.OwnerReferences) != 1 || lease.OwnerReferences[0].Name != a.node || ptr.Deref(lease.Spec.HolderIdentity, "") != a.node {
		t.Errorf("node report %+v", lease.ObjectMeta)
	}

	// Node b's writes fail from now on; a new generation reaches only a.
	b.applier.failNext(1000, errors.New("injected: netlink says no"))
	if err := apiClient.Get(ctx, client.ObjectKeyFromObject(pc), pc); err != nil {
		t.Fatal(err)
	}
	pc.Spec.MasqueradeAll = true
	if err := apiClient.Update(ctx, pc); err != nil {
		t.Fatal(err)
	}
	statusIs("b degraded, a current", func(st proxyv1alpha1.ProxyConfigStatus, gen int64) error {
		if gen != 2 || st.Nodes != (proxyv1alpha1.NodeSummary{Total: 2, Current: 1, Degraded: 1}) {
			return fmt.Errorf("generation %d, nodes %+v", gen, st.Nodes)
		}
		if err := condition(st, proxyv1alpha1.ConditionDegraded, metav1.ConditionTrue, gen); err != nil {
			return err
		}
		if msg := meta.FindStatusCondition(st.Conditions, proxyv1alpha1.ConditionDegraded).Message; !strings.Contains(msg, b.node) || !strings.Contains(msg, "netlink says no") {
			return fmt.Errorf("degraded message %q names neither the node nor the failure", msg)
		}
		return nil
	})

	b.applier.failNext(0, nil)
	statusIs("b recovered", func(st proxyv1alpha1.ProxyConfigStatus, gen int64) error {
		if st.Nodes != (proxyv1alpha1.NodeSummary{Total: 2, Current: 2}) {
			return fmt.Errorf("nodes %+v", st.Nodes)
		}
		return condition(st, proxyv1alpha1.ConditionDegraded, metav1.ConditionFalse, gen)
	})
}

func TestSummarize(t *testing.T) {
	now := time.Now()
	lease := func(node, config, generation, degraded string, age time.Duration) coordinationv1.Lease {
		l := coordinationv1.Lease{ObjectMeta: metav1.ObjectMeta{Name: "nftproxy-node-" + node,
			Annotations: map[string]string{configAnno: config, generationAnno: generation}}}
		if degraded != "" {
			l.Annotations[degradedAnno] = degraded
		}
		l.Spec.HolderIdentity = ptr.To(node)
		l.Spec.RenewTime = &metav1.MicroTime{Time: now.Add(-age)}
		return l
	}
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "default", Generation: 3}}
	st := summarize(pc, []coordinationv1.Lease{
		lease("a", "default", "3", "", time.Minute),
		lease("b", "default", "2", "", time.Minute),
		lease("c", "default", "3", "write failed", time.Minute),
		lease("d", "default", "3", "", reportExpiry+time.Minute), // gone
		lease("e", "other", "3", "", time.Minute),
	}, now)
	if st.Nodes != (proxyv1alpha1.NodeSummary{Total: 3, Current: 1, Degraded: 1}) {
		t.Errorf("nodes %+v", st.Nodes)
	}
	if c := meta.FindStatusCondition(st.Conditions, proxyv1alpha1.ConditionDegraded); c == nil || c.Status != metav1.ConditionTrue || !strings.Contains(c.Message, "c: write failed") {
		t.Errorf("degraded %+v", c)
	}

	pc.Spec.MasqueradeBit = ptr.To[int32](40)
	st = summarize(pc, nil, now)
	if c := meta.FindStatusCondition(st.Conditions, proxyv1alpha1.ConditionAccepted); c == nil || c.Status != metav1.ConditionFalse || !strings.Contains(c.Message, "masqueradeBit") {
		t.Errorf("accepted %+v for an invalid spec", c)
	}
}
