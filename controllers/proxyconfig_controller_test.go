package controllers

import (
	"context"
	"errors"
	"testing"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/client/fake"
	"sigs.k8s.io/controller-runtime/pkg/reconcile"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

func newConfigReconciler(t *testing.T, objects ...*proxyv1alpha1.ProxyConfig) (*ConfigReconciler, *[]EffectiveConfig) {
	t.Helper()
	scheme := runtime.NewScheme()
	if err := proxyv1alpha1.AddToScheme(scheme); err != nil {
		t.Fatal(err)
	}
	builder := fake.NewClientBuilder().WithScheme(scheme)
	for _, o := range objects {
		builder = builder.WithObjects(o)
	}
	var changes []EffectiveConfig
	return &ConfigReconciler{
		Reader:   builder.Build(),
		Name:     "default",
		Store:    &ConfigStore{},
		OnChange: func(c EffectiveConfig) { changes = append(changes, c) },
	}, &changes
}

var defaultRequest = reconcile.Request{NamespacedName: types.NamespacedName{Name: "default"}}

func TestConfigReconcilerUsesDefaultsWhenMissing(t *testing.T) {
	r, changes := newConfigReconciler(t)
	if err := r.Store.ReadyCheck(nil); err == nil {
		t.Error("ready before the first load")
	}
	if _, err := r.Reconcile(context.Background(), defaultRequest); err != nil {
		t.Fatal(err)
	}
	got, ok := r.Store.Get()
	if !ok || !got.FromDefaults || got.Generation != 0 {
		t.Fatalf("store holds %+v (loaded %v), want the defaults", got, ok)
	}
	var want proxyv1alpha1.ProxyConfigSpec
	want.Default()
	if *got.Spec.MasqueradeBit != *want.MasqueradeBit || got.Spec.SyncInterval.Duration != want.SyncInterval.Duration {
		t.Errorf("spec = %+v, want %+v", got.Spec, want)
	}
	if err := r.Store.ReadyCheck(nil); err != nil {
		t.Errorf("not ready after loading: %v", err)
	}
	if len(*changes) != 1 {
		t.Errorf("OnChange called %d times, want 1", len(*changes))
	}
	// Nothing changed: no second notification.
	if _, err := r.Reconcile(context.Background(), defaultRequest); err != nil {
		t.Fatal(err)
	}
	if len(*changes) != 1 {
		t.Errorf("OnChange called %d times after a no-op reconcile, want 1", len(*changes))
	}
}

func TestConfigReconcilerDefaultsAndKeepsLastGoodSpec(t *testing.T) {
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "default", Generation: 4}}
	pc.Spec.MasqueradeAll = true
	r, changes := newConfigReconciler(t, pc)
	ctx := context.Background()
	if _, err := r.Reconcile(ctx, defaultRequest); err != nil {
		t.Fatal(err)
	}
	got, _ := r.Store.Get()
	if got.FromDefaults || got.Generation != 4 || !got.Spec.MasqueradeAll || got.Spec.MasqueradeBit == nil {
		t.Fatalf("store holds %+v, want generation 4, masqueradeAll, defaulted", got)
	}

	// A spec that slipped past the API server's validation is refused
	// and the previous one stays.
	bit := int32(99)
	pc.Spec.MasqueradeBit = &bit
	pc.Generation = 5
	if err := r.Reader.(client.Client).Update(ctx, pc); err != nil {
		t.Fatal(err)
	}
	_, err := r.Reconcile(ctx, defaultRequest)
	if err == nil || !errors.Is(err, reconcile.TerminalError(nil)) {
		t.Fatalf("want a terminal error for an invalid spec, got %v", err)
	}
	got, _ = r.Store.Get()
	if *got.Spec.MasqueradeBit != proxyv1alpha1.DefaultMasqueradeBit {
		t.Errorf("invalid spec replaced the previous one: %+v", got.Spec)
	}
	if len(*changes) != 1 {
		t.Errorf("OnChange called %d times, want 1", len(*changes))
	}
}

func TestConfigStoreGetReturnsACopy(t *testing.T) {
	s := &ConfigStore{}
	var spec proxyv1alpha1.ProxyConfigSpec
	spec.Default()
	s.set(EffectiveConfig{Spec: spec})
	a, _ := s.Get()
	*a.Spec.MasqueradeBit = 3
	b, _ := s.Get()
	if *b.Spec.MasqueradeBit != proxyv1alpha1.DefaultMasqueradeBit {
		t.Error("a caller's change to Get's result reached the store")
	}
}
