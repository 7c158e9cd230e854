package v1alpha1_test

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/yaml"

	"github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/test/testenv"
)

// TestCRDAgainstAPIServer installs the generated CRD into a real API server
// and checks what it accepts, what it refuses and how it defaults.
func TestCRDAgainstAPIServer(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()

	t.Run("sample is accepted and defaulted", func(t *testing.T) {
		raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "config", "samples", "proxy_v1alpha1_proxyconfig.yaml"))
		if err != nil {
			t.Fatal(err)
		}
		var sample v1alpha1.ProxyConfig
		if err := yaml.UnmarshalStrict(raw, &sample); err != nil {
			t.Fatalf("sample does not match the Go types: %v", err)
		}
		if sample.Name != "default" {
			t.Errorf("sample is named %q, want default (the agents' default --config-name)", sample.Name)
		}
		if err := env.Client.Create(ctx, &sample, client.FieldValidation("Strict")); err != nil {
			t.Fatalf("creating the sample: %v", err)
		}
		var got v1alpha1.ProxyConfig
		if err := env.Client.Get(ctx, client.ObjectKey{Name: "default"}, &got); err != nil {
			t.Fatal(err)
		}
		if err := got.Spec.Validate(); err != nil {
			t.Errorf("stored sample fails Go validation: %v", err)
		}
		want := sample.Spec.DeepCopy()
		want.Default()
		if !reflect.DeepEqual(got.Spec, *want) {
			t.Errorf("stored sample spec = %+v, want %+v", got.Spec, *want)
		}
	})

	t.Run("empty spec gets the Go defaults", func(t *testing.T) {
		for _, raw := range []string{`{"apiVersion": "proxy.nftproxy.io/v1alpha1", "kind": "ProxyConfig", "metadata": {"name": "nospec"}}`,
			`{"apiVersion": "proxy.nftproxy.io/v1alpha1", "kind": "ProxyConfig", "metadata": {"name": "emptyspec"}, "spec": {}}`} {
			u := &unstructured.Unstructured{}
			if err := u.UnmarshalJSON([]byte(raw)); err != nil {
				t.Fatal(err)
			}
			if err := env.Client.Create(ctx, u); err != nil {
				t.Fatalf("creating %s: %v", u.GetName(), err)
			}
			var got v1alpha1.ProxyConfig
			if err := env.Client.Get(ctx, client.ObjectKey{Name: u.GetName()}, &got); err != nil {
				t.Fatal(err)
			}
			var want v1alpha1.ProxyConfigSpec
			want.Default()
			if !reflect.DeepEqual(got.Spec, want) {
				gotJSON, _ := json.Marshal(got.Spec)
				wantJSON, _ := json.Marshal(want)
				t.Errorf("%s: API server defaults %s, Go defaults %s", u.GetName(), gotJSON, wantJSON)
			}
		}
	})

	t.Run("invalid specs are refused naming the field", func(t *testing.T) {
		for i, tc := range invalidSpecs {
			t.Run(tc.name, func(t *testing.T) {
				u := proxyConfigWithSpec(t, fmt.Sprintf("invalid-%d", i), tc.spec)
				err := env.Client.Create(ctx, u)
				if err == nil {
					t.Fatalf("API server accepted %s", tc.spec)
				}
				t.Logf("refused: %v", err)
				if !apierrors.IsInvalid(err) {
					t.Fatalf("want an Invalid error, got %v", err)
				}
				if !strings.Contains(err.Error(), tc.field+":") {
					t.Errorf("error does not name %s: %v", tc.field, err)
				}
			})
		}
	})

	t.Run("unknown field is refused under strict validation", func(t *testing.T) {
		u := proxyConfigWithSpec(t, "typo", `{"masqueradeBits": 3}`)
		err := env.Client.Create(ctx, u, client.FieldValidation("Strict"))
		if err == nil || !strings.Contains(err.Error(), "spec.masqueradeBits") {
			t.Errorf("want an error naming spec.masqueradeBits, got %v", err)
		}
	})

	t.Run("an update to an invalid value is refused", func(t *testing.T) {
		var pc v1alpha1.ProxyConfig
		if err := env.Client.Get(ctx, client.ObjectKey{Name: "default"}, &pc); err != nil {
			t.Fatal(err)
		}
		bit := int32(32)
		pc.Spec.MasqueradeBit = &bit
		err := env.Client.Update(ctx, &pc)
		if err == nil || !strings.Contains(err.Error(), "spec.masqueradeBit:") {
			t.Errorf("want an error naming spec.masqueradeBit, got %v", err)
		}
	})

	t.Run("status is a subresource", func(t *testing.T) {
		var pc v1alpha1.ProxyConfig
		if err := env.Client.Get(ctx, client.ObjectKey{Name: "default"}, &pc); err != nil {
			t.Fatal(err)
		}
		generation := pc.Generation
		pc.Status.Nodes.Total = 3
		if err := env.Client.Status().Update(ctx, &pc); err != nil {
			t.Fatalf("updating status: %v", err)
		}
		if err := env.Client.Get(ctx, client.ObjectKey{Name: "default"}, &pc); err != nil {
			t.Fatal(err)
		}
		if pc.Status.Nodes.Total != 3 || pc.Generation != generation {
			t.Errorf("after a status update: nodes.total = %d, generation %d -> %d", pc.Status.Nodes.Total, generation, pc.Generation)
		}
	})
}

func proxyConfigWithSpec(t *testing.T, name, spec string) *unstructured.Unstructured {
	t.Helper()
	var specMap map[string]any
	if err := json.Unmarshal([]byte(spec), &specMap); err != nil {
		t.Fatalf("%s: %v", spec, err)
	}
	u := &unstructured.Unstructured{Object: map[string]any{"spec": specMap}}
	u.SetAPIVersion(v1alpha1.GroupVersion.String())
	u.SetKind("ProxyConfig")
	u.SetName(name)
	return u
}
