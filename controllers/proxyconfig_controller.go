package controllers

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"reflect"
	"sync"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/util/workqueue"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/builder"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/log"
	"sigs.k8s.io/controller-runtime/pkg/predicate"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"
	"sigs.k8s.io/controller-runtime/pkg/source"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// EffectiveConfig is the configuration a node's proxy runs with: the spec
// of its ProxyConfig, defaulted and validated, or the defaults when that
// ProxyConfig does not exist.
type EffectiveConfig struct {
	// Spec is defaulted: every pointer field is set.
	Spec proxyv1alpha1.ProxyConfigSpec
	// Generation is the ProxyConfig's metadata.generation; 0 for defaults.
	Generation int64
	// FromDefaults is true when no ProxyConfig of the configured name exists.
	FromDefaults bool
}

// ConfigStore holds the latest EffectiveConfig. Readers get a copy; the
// store is safe for concurrent use.
type ConfigStore struct {
	mu     sync.RWMutex
	config *EffectiveConfig
}

// Get returns the effective configuration, and false until the first one
// has been loaded.
func (s *ConfigStore) Get() (EffectiveConfig, bool) {
	s.mu.RLock()
	defer s.mu.RUnlock()
	if s.config == nil {
		return EffectiveConfig{}, false
	}
	c := *s.config
	c.Spec = *s.config.Spec.DeepCopy()
	return c, true
}

// set stores c and reports whether it differs from what was stored.
func (s *ConfigStore) set(c EffectiveConfig) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	changed := s.config == nil || !reflect.DeepEqual(*s.config, c)
	s.config = &c
	return changed
}

// ReadyCheck is a healthz.Checker that fails until a configuration has been
// loaded.
func (s *ConfigStore) ReadyCheck(_ *http.Request) error {
	if _, ok := s.Get(); !ok {
		return errors.New("ProxyConfig not loaded yet")
	}
	return nil
}

// ConfigReconciler loads the ProxyConfig named Name into Store whenever it
// is created, changed or deleted, and once at start so that a missing
// ProxyConfig yields the defaults.
type ConfigReconciler struct {
	Reader client.Reader
	Name   string
	Store  *ConfigStore
	// OnChange, when set, is called after the effective configuration
	// changed.
	OnChange func(EffectiveConfig)
}

// Reconcile implements reconcile.Reconciler. An invalid ProxyConfig (one
// that slipped past the API server's validation, say under an older CRD)
// leaves the previous configuration in place, or the agent unready if there
// is none yet, and is not retried until the object changes: programming a
// node from settings its admin did not write is worse than waiting.
func (r *ConfigReconciler) Reconcile(ctx context.Context, req reconcile.Request) (reconcile.Result, error) {
	var pc proxyv1alpha1.ProxyConfig
	var effective EffectiveConfig
	err := r.Reader.Get(ctx, req.NamespacedName, &pc)
	switch {
	case apierrors.IsNotFound(err):
		effective.FromDefaults = true
		effective.Spec.Default()
	case err != nil:
		return reconcile.Result{}, fmt.Errorf("reading ProxyConfig %q: %w", req.Name, err)
	default:
		effective.Generation = pc.Generation
		effective.Spec = *pc.Spec.DeepCopy()
		effective.Spec.Default()
		if err := effective.Spec.Validate(); err != nil {
			return reconcile.Result{}, reconcile.TerminalError(fmt.Errorf("ProxyConfig %q generation %d is invalid, keeping the previous configuration: %w", req.Name, pc.Generation, err))
		}
	}
	if r.Store.set(effective) {
		log.FromContext(ctx).Info("Effective ProxyConfig changed",
			"name", r.Name, "fromDefaults", effective.FromDefaults, "generation", effective.Generation, "spec", effective.Spec)
		if r.OnChange != nil {
			r.OnChange(effective)
		}
	}
	return reconcile.Result{}, nil
}

// SetupWithManager registers the reconciler. The manager's cache should
// hold only the named ProxyConfig (see cmd/nftproxy); the predicate keeps
// the reconciler correct with a cache that holds more.
func (r *ConfigReconciler) SetupWithManager(mgr ctrl.Manager) error {
	named := predicate.NewPredicateFuncs(func(o client.Object) bool { return o.GetName() == r.Name })
	atStart := source.Func(func(_ context.Context, q workqueue.TypedRateLimitingInterface[reconcile.Request]) error {
		q.Add(reconcile.Request{NamespacedName: types.NamespacedName{Name: r.Name}})
		return nil
	})
	return ctrl.NewControllerManagedBy(mgr).
		Named("proxyconfig").
		For(&proxyv1alpha1.ProxyConfig{}, builder.WithPredicates(named, predicate.GenerationChangedPredicate{})).
		WatchesRawSource(atStart).
		WithOptions(controller.Options{NeedLeaderElection: boolPtr(false)}).
		Complete(r)
}
