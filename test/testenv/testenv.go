// Package testenv starts a real kube-apiserver and etcd (controller-runtime's
// envtest) with nftproxy's CRD installed, and renders the project's
// kustomize directories, for tests that need a real API server and for
// hack/run-local.
package testenv

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"testing"

	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	kruntime "k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/kyaml/filesys"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// RepoRoot is the absolute path of the repository's top directory.
func RepoRoot() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "..")
}

// Scheme knows the built-in Kubernetes types and ProxyConfig.
func Scheme() *kruntime.Scheme {
	s := kruntime.NewScheme()
	if err := clientgoscheme.AddToScheme(s); err != nil {
		panic(err)
	}
	if err := proxyv1alpha1.AddToScheme(s); err != nil {
		panic(err)
	}
	return s
}

// NewEnvironment describes an API server with the ProxyConfig CRD
// installed and a client scheme that knows it; Start runs it.
func NewEnvironment() *envtest.Environment {
	return &envtest.Environment{
		CRDDirectoryPaths:     []string{filepath.Join(RepoRoot(), "config", "crd", "bases")},
		ErrorIfCRDPathMissing: true,
		Scheme:                Scheme(),
	}
}

// Env is a running API server with the CRD installed.
type Env struct {
	*envtest.Environment
	Config *rest.Config
	Client client.Client
}

// Start runs kube-apiserver and etcd from $KUBEBUILDER_ASSETS (`make test`
// sets it, building them when needed) with the ProxyConfig CRD installed,
// and stops them when the test ends. Without the binaries the test is
// skipped, except under CI, where it fails.
func Start(t testing.TB) *Env {
	t.Helper()
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		msg := "KUBEBUILDER_ASSETS is not set: run `make test` (it builds kube-apiserver and etcd into bin/k8s)"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	env := NewEnvironment()
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("starting envtest: %v", err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stopping envtest: %v", err)
		}
	})
	c, err := client.New(cfg, client.Options{Scheme: env.Scheme})
	if err != nil {
		t.Fatalf("creating client: %v", err)
	}
	return &Env{Environment: env, Config: cfg, Client: c}
}

// Kustomize renders the kustomization in dir (relative to the repository
// root), as `kubectl kustomize` does, into unstructured objects.
func Kustomize(t testing.TB, dir string) []*unstructured.Unstructured {
	t.Helper()
	objects, err := Render(dir)
	if err != nil {
		t.Fatal(err)
	}
	return objects
}

// Render is Kustomize for code without a testing.TB.
func Render(dir string) ([]*unstructured.Unstructured, error) {
	resources, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).
		Run(filesys.MakeFsOnDisk(), filepath.Join(RepoRoot(), dir))
	if err != nil {
		return nil, fmt.Errorf("kustomize %s: %w", dir, err)
	}
	var objects []*unstructured.Unstructured
	for _, r := range resources.Resources() {
		raw, err := r.MarshalJSON()
		if err != nil {
			return nil, fmt.Errorf("kustomize %s: %s: %w", dir, r.CurId(), err)
		}
		u := &unstructured.Unstructured{}
		if err := u.UnmarshalJSON(raw); err != nil {
			return nil, fmt.Errorf("kustomize %s: %s: %w", dir, r.CurId(), err)
		}
		objects = append(objects, u)
	}
	return objects, nil
}
