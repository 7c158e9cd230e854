package controllers

import (
	"context"
	"fmt"
	"net/netip"
	"slices"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"
)

// NodeReconciler puts this node's addresses, zone and pod CIDRs into State.
type NodeReconciler struct {
	Reader client.Reader
	Name   string
	State  *State
}

// Reconcile implements reconcile.Reconciler.
func (r *NodeReconciler) Reconcile(ctx context.Context, _ reconcile.Request) (reconcile.Result, error) {
	var node corev1.Node
	err := r.Reader.Get(ctx, types.NamespacedName{Name: r.Name}, &node)
	switch {
	case apierrors.IsNotFound(err):
		r.State.SetNode(NodeInfo{})
	case err != nil:
		return reconcile.Result{}, fmt.Errorf("reading Node %q: %w", r.Name, err)
	default:
		r.State.SetNode(NodeInfoOf(&node))
	}
	return reconcile.Result{}, nil
}

// NodeInfoOf extracts what the proxy uses of a Node: its InternalIP and
// ExternalIP addresses (where NodePorts are served, as upstream's
// "primary" nodePortAddresses), its zone label and its pod CIDRs.
func NodeInfoOf(node *corev1.Node) NodeInfo {
	info := NodeInfo{Found: true, Zone: node.Labels[corev1.LabelTopologyZone]}
	for _, a := range node.Status.Addresses {
		if a.Type != corev1.NodeInternalIP && a.Type != corev1.NodeExternalIP {
			continue
		}
		if ip, err := netip.ParseAddr(a.Address); err == nil && !slices.Contains(info.Addresses, ip.Unmap()) {
			info.Addresses = append(info.Addresses, ip.Unmap())
		}
	}
	cidrs := node.Spec.PodCIDRs
	if len(cidrs) == 0 && node.Spec.PodCIDR != "" {
		cidrs = []string{node.Spec.PodCIDR}
	}
	for _, c := range cidrs {
		if p, err := netip.ParsePrefix(c); err == nil {
			info.PodCIDRs = append(info.PodCIDRs, p.Masked())
		}
	}
	return info
}

// SetupWithManager registers the reconciler. The manager's cache should
// hold only this Node; the predicate keeps it correct with one that holds
// more. A reconcile at start reports a Node that does not exist.
func (r *NodeReconciler) SetupWithManager(mgr ctrl.Manager) error {
	named := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetName() == r.Name })
	atStart := source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
		q.Add(reconcile.Request{NamespacedName: types.NamespacedName{Name: r.Name}})
		return nil
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("node").
		For(&corev1.Node{}, builder.WithPredicates(named)).
		WatchesRawSource(atStart).
		WithOptions(controller.Options{NeedLeaderElection: boolPtr(false)}).
		Complete(r)
}
