package e2e

import (
	"context"
	"fmt"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	apimeta "k8s.io/apimachinery/pkg/api/meta"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// TestProxyConfigStatusCountsEveryNode: each agent, under the DaemonSet's
// RBAC, reports itself in a Lease in nftproxy-system, and the elected one
// sums the reports up in the ProxyConfig's status: every node current,
// none degraded, Accepted.
func TestProxyConfigStatusCountsEveryNode(t *testing.T) {
	c := use(t)
	ctx := context.Background()
	// The leader writes the status every 30 s.
	deadline := time.Now().Add(90 * time.Second)
	for {
		err := func() error {
			for _, n := range c.Nodes {
				var lease coordinationv1.Lease
				if err := c.API.Get(ctx, client.ObjectKey{Namespace: "nftproxy-system", Name: "nftproxy-node-" + n.Name}, &lease); err != nil {
					return fmt.Errorf("%s's report: %w", n.Name, err)
				}
			}
			var pc proxyv1alpha1.ProxyConfig
			if err := c.API.Get(ctx, client.ObjectKey{Name: "default"}, &pc); err != nil {
				return err
			}
			want := proxyv1alpha1.NodeSummary{Total: int32(len(c.Nodes)), Current: int32(len(c.Nodes))}
			if pc.Status.Nodes != want {
				return fmt.Errorf("status.nodes %+v, want %+v", pc.Status.Nodes, want)
			}
			if !apimeta.IsStatusConditionTrue(pc.Status.Conditions, "Accepted") {
				return fmt.Errorf("not Accepted: %+v", pc.Status.Conditions)
			}
			if apimeta.IsStatusConditionTrue(pc.Status.Conditions, "Degraded") {
				return fmt.Errorf("Degraded: %+v", pc.Status.Conditions)
			}
			return nil
		}()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("ProxyConfig status: %v", err)
		}
		time.Sleep(time.Second)
	}
}
