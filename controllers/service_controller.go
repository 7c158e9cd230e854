package controllers

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/handler"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	"github.com/nftproxy/nftproxy/dataplane"
)

// ServiceNameIndex is the field index of EndpointSlices on their
// kubernetes.io/service-name label, so a Service's slices are found in
// O(slices of that Service).
const ServiceNameIndex = "nftproxy.serviceName"

// annotationTriggerTime is set by the EndpointSlice controller to the time
// of the change (a pod became ready, a Service changed) the slice reflects.
const annotationTriggerTime = "endpoints.kubernetes.io/last-change-trigger-time"

// IndexEndpointSlices registers ServiceNameIndex with the manager's cache.
func IndexEndpointSlices(ctx context.Context, mgr ctrl.Manager) error {
	return mgr.GetFieldIndexer().IndexField(ctx, &discoveryv1.EndpointSlice{}, ServiceNameIndex, func(o client.Object) []string {
		if name := o.GetLabels()[discoveryv1.LabelServiceName]; name != "" {
			return []string{name}
		}
		return nil
	})
}

// ServiceReconciler puts each Service, with its EndpointSlices, into State.
// A Service and its slices form one unit, keyed by the Service, so that a
// burst of slice updates for one Service costs one recompute.
type ServiceReconciler struct {
	Reader client.Reader
	State  *State

	// seen remembers, per Service, each slice's last trigger time, so
	// that only new slice versions count towards network programming
	// latency.
	mu   sync.Mutex
	seen map[types.NamespacedName]map[string]string
}

// Reconcile implements reconcile.Reconciler.
func (r *ServiceReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	st, triggered, err := r.load(ctx, req.NamespacedName)
	if err != nil {
		return reconcile.Result{}, err
	}
	r.State.SetService(req.NamespacedName, st, triggered...)
	return reconcile.Result{}, nil
}

// load reads a Service and its slices from the cache. A Service that does
// not exist gives a ServiceState with a nil Service; its slices are then
// irrelevant.
func (r *ServiceReconciler) load(ctx context.Context, key types.NamespacedName) (dataplane.ServiceState, []time.Time, error) {
	svc := &corev1.Service{}
	if err := r.Reader.Get(ctx, key, svc); err != nil {
		if apierrors.IsNotFound(err) {
			r.forget(key)
			return dataplane.ServiceState{}, nil, nil
		}
		return dataplane.ServiceState{}, nil, fmt.Errorf("reading Service %s: %w", key, err)
	}
	var list discoveryv1.EndpointSliceList
	if err := r.Reader.List(ctx, &list, client.InNamespace(key.Namespace), client.MatchingFields{ServiceNameIndex: key.Name}); err != nil {
		return dataplane.ServiceState{}, nil, fmt.Errorf("listing EndpointSlices of Service %s: %w", key, err)
	}
	st := dataplane.ServiceState{Service: svc, Slices: make([]*discoveryv1.EndpointSlice, len(list.Items))}
	for i := range list.Items {
		st.Slices[i] = &list.Items[i]
	}
	return st, r.newTriggers(key, st.Slices), nil
}

// newTriggers returns the trigger times of the slices whose annotation
// changed since this Service was last loaded, and remembers the new ones.
func (r *ServiceReconciler) newTriggers(svc types.NamespacedName, slices []*discoveryv1.EndpointSlice) []time.Time {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.seen == nil {
		r.seen = map[types.NamespacedName]map[string]string{}
	}
	old := r.seen[svc]
	now := make(map[string]string, len(slices))
	var out []time.Time
	for _, sl := range slices {
		raw := sl.Annotations[annotationTriggerTime]
		now[sl.Name] = raw
		if prev, ok := old[sl.Name]; ok && prev == raw {
			continue
		}
		if t, err := time.Parse(time.RFC3339Nano, raw); err == nil {
			out = append(out, t)
		}
	}
	r.seen[svc] = now
	return out
}

func (r *ServiceReconciler) forget(svc types.NamespacedName) {
	r.mu.Lock()
	defer r.mu.Unlock()
	delete(r.seen, svc)
}

// SetupWithManager registers the reconciler: Services by their own key,
// EndpointSlices by the Service their label names.
func (r *ServiceReconciler) SetupWithManager(mgr ctrl.Manager) error {
	toService := handler.EnqueueRequestsFromMapFunc(func(_ context.Context, o client.Object) []reconcile.Request {
		name := o.GetLabels()[discoveryv1.LabelServiceName]
		if name == "" || strings.ContainsRune(name, '/') {
			return nil
		}
		return []reconcile.Request{{NamespacedName: types.NamespacedName{Namespace: o.GetNamespace(), Name: name}}}
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("service").
		For(&corev1.Service{}).
		Watches(&discoveryv1.EndpointSlice{}, toService).
		WithOptions(controller.Options{
			// Every agent programs its own node: no leader election.
			NeedLeaderElection:      boolPtr(false),
			MaxConcurrentReconciles: 4,
		}).
		Complete(r)
}

func boolPtr(b bool) *bool { return &b }

// LoadServices puts every Service in reader, with its slices, into state.
// The syncer calls it once the caches have synced and before its first
// sync, so that the first write holds every Service even while the
// reconcilers are still working through the initial list.
func LoadServices(ctx context.Context, reader client.Reader, state *State) error {
	var services corev1.ServiceList
	if err := reader.List(ctx, &services); err != nil {
		return fmt.Errorf("listing Services: %w", err)
	}
	var slices discoveryv1.EndpointSliceList
	if err := reader.List(ctx, &slices); err != nil {
		return fmt.Errorf("listing EndpointSlices: %w", err)
	}
	byService := map[types.NamespacedName][]*discoveryv1.EndpointSlice{}
	for i := range slices.Items {
		sl := &slices.Items[i]
		if name := sl.Labels[discoveryv1.LabelServiceName]; name != "" {
			key := types.NamespacedName{Namespace: sl.Namespace, Name: name}
			byService[key] = append(byService[key], sl)
		}
	}
	for i := range services.Items {
		svc := &services.Items[i]
		key := types.NamespacedName{Namespace: svc.Namespace, Name: svc.Name}
		state.SetService(key, dataplane.ServiceState{Service: svc, Slices: byService[key]})
	}
	return nil
}
