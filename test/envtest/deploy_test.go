// Package envtest_test checks the deployment (config/) and the agent binary
// against a real API server.
package envtest_test

import (
	"context"
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nftproxy/nftproxy/test/testenv"
)

// TestKustomizeDefaultIsAccepted renders config/default as
// `kubectl apply -k config/default` would and has the API server accept
// every object (server-side dry-run after the Namespace and the CRD exist).
func TestKustomizeDefaultIsAccepted(t *testing.T) {
	env := testenv.Start(t)
	ctx := context.Background()
	objects := testenv.Kustomize(t, "config/default")

	kinds := map[string]int{}
	for _, o := range objects {
		kinds[o.GetKind()]++
	}
	for _, kind := range []string{"Namespace", "CustomResourceDefinition", "ServiceAccount",
		"ClusterRoleBinding", "Role", "RoleBinding", "DaemonSet"} {
		if kinds[kind] != 1 {
			t.Errorf("config/default renders %d %s objects, want 1", kinds[kind], kind)
		}
	}
	if kinds["ClusterRole"] != 2 {
		t.Errorf("config/default renders %d ClusterRoles, want the agent's and the metrics reader's", kinds["ClusterRole"])
	}

	// The Namespace must exist for real before namespaced objects can be
	// dry-run into it; the CRD is already installed by envtest.
	for _, o := range objects {
		if o.GetKind() == "Namespace" {
			if err := env.Client.Create(ctx, o.DeepCopy()); err != nil {
				t.Fatalf("creating namespace %s: %v", o.GetName(), err)
			}
		}
	}
	for _, o := range objects {
		err := env.Client.Apply(ctx, client.ApplyConfigurationFromUnstructured(o.DeepCopy()), client.DryRunAll,
			client.FieldOwner("nftproxy-test"), client.ForceOwnership)
		if err != nil {
			t.Errorf("API server refuses %s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}

	samples := testenv.Kustomize(t, "config/samples")
	for _, o := range samples {
		if err := env.Client.Create(ctx, o.DeepCopy(), client.DryRunAll, client.FieldValidation("Strict")); err != nil {
			t.Errorf("API server refuses sample %s %s: %v", o.GetKind(), o.GetName(), err)
		}
	}
}

// TestRBACIsLeastPrivilege checks that the agent may read what a proxy
// needs and write only ProxyConfig status, Events and, in its own
// namespace, Leases.
func TestRBACIsLeastPrivilege(t *testing.T) {
	objects := testenv.Kustomize(t, "config/default")
	var clusterRole, metricsReader rbacv1.ClusterRole
	var role rbacv1.Role
	for _, o := range objects {
		switch o.GetKind() {
		case "ClusterRole":
			if o.GetName() == "nftproxy-metrics-reader" {
				fromUnstructured(t, o, &metricsReader)
			} else {
				fromUnstructured(t, o, &clusterRole)
			}
		case "Role":
			fromUnstructured(t, o, &role)
			if role.Namespace != "nftproxy-system" {
				t.Errorf("Role %s is in namespace %q, want nftproxy-system", role.Name, role.Namespace)
			}
		}
	}

	readOnly := []string{"get", "list", "watch"}
	want := map[string][]string{ // "group/resource" -> verbs
		"/services":                             readOnly,
		"/nodes":                                readOnly,
		"discovery.k8s.io/endpointslices":       readOnly,
		"proxy.nftproxy.io/proxyconfigs":        readOnly,
		"proxy.nftproxy.io/proxyconfigs/status": {"get", "patch", "update"},
		"/events":                               {"create", "patch"},
		"events.k8s.io/events":                  {"create", "patch"},
		// The secure metrics endpoint's authentication and authorization.
		"authentication.k8s.io/tokenreviews":        {"create"},
		"authorization.k8s.io/subjectaccessreviews": {"create"},
	}
	got := grants(t, clusterRole.Rules)
	if !mapsEqual(got, want) {
		t.Errorf("ClusterRole grants %v, want exactly %v", got, want)
	}
	if len(metricsReader.Rules) != 1 || !slices.Equal(metricsReader.Rules[0].NonResourceURLs, []string{"/metrics"}) ||
		!slices.Equal(metricsReader.Rules[0].Verbs, []string{"get"}) || len(metricsReader.Rules[0].Resources) != 0 {
		t.Errorf("metrics reader grants %+v, want GET /metrics only", metricsReader.Rules)
	}
	leases := grants(t, role.Rules)
	if len(leases) != 1 || leases["coordination.k8s.io/leases"] == nil {
		t.Errorf("leader-election Role grants %v, want leases only", leases)
	}
}

// TestDaemonSetRunsWithNETADMINOnly checks the agent's pod: on every node,
// on the host network, node-critical, with no privilege beyond NET_ADMIN.
func TestDaemonSetRunsWithNETADMINOnly(t *testing.T) {
	var ds appsv1.DaemonSet
	for _, o := range testenv.Kustomize(t, "config/default") {
		if o.GetKind() == "DaemonSet" {
			fromUnstructured(t, o, &ds)
		}
	}
	pod := ds.Spec.Template.Spec
	if !pod.HostNetwork {
		t.Error("hostNetwork is not set")
	}
	if pod.PriorityClassName != "system-node-critical" {
		t.Errorf("priorityClassName = %q", pod.PriorityClassName)
	}
	if !slices.ContainsFunc(pod.Tolerations, func(tol corev1.Toleration) bool {
		return tol.Operator == corev1.TolerationOpExists && tol.Key == "" && tol.Effect == ""
	}) {
		t.Errorf("no toleration of every taint: %v", pod.Tolerations)
	}
	if pod.DNSPolicy != corev1.DNSDefault {
		t.Errorf("dnsPolicy = %q, want Default: cluster DNS is behind a ClusterIP the agent has yet to program", pod.DNSPolicy)
	}
	if pod.ServiceAccountName != "nftproxy" {
		t.Errorf("serviceAccountName = %q", pod.ServiceAccountName)
	}
	if len(pod.Containers) != 1 {
		t.Fatalf("%d containers, want 1", len(pod.Containers))
	}
	c := pod.Containers[0]
	sc := c.SecurityContext
	if sc == nil || sc.Capabilities == nil {
		t.Fatal("the container has no securityContext.capabilities")
	}
	if sc.Privileged != nil && *sc.Privileged {
		t.Error("the container is privileged")
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		t.Error("allowPrivilegeEscalation is not false")
	}
	if !slices.Equal(sc.Capabilities.Drop, []corev1.Capability{"ALL"}) || !slices.Equal(sc.Capabilities.Add, []corev1.Capability{"NET_ADMIN"}) {
		t.Errorf("capabilities drop %v add %v, want drop ALL add NET_ADMIN", sc.Capabilities.Drop, sc.Capabilities.Add)
	}
	env := map[string]corev1.EnvVar{}
	for _, e := range c.Env {
		env[e.Name] = e
	}
	if e := env["NODE_NAME"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "spec.nodeName" {
		t.Errorf("NODE_NAME does not come from spec.nodeName: %+v", e)
	}
	if e := env["POD_NAMESPACE"]; e.ValueFrom == nil || e.ValueFrom.FieldRef == nil || e.ValueFrom.FieldRef.FieldPath != "metadata.namespace" {
		t.Errorf("POD_NAMESPACE does not come from metadata.namespace: %+v", e)
	}
	if e := env["GOMEMLIMIT"]; e.ValueFrom == nil || e.ValueFrom.ResourceFieldRef == nil || e.ValueFrom.ResourceFieldRef.Resource != "limits.memory" {
		t.Errorf("GOMEMLIMIT does not follow the memory limit: %+v", e)
	}
	if !slices.Contains(c.Args, "--metrics-secure") {
		t.Errorf("metrics are served without authentication: args %v", c.Args)
	}
	if _, ok := env["KUBERNETES_SERVICE_HOST"]; !ok {
		t.Error("KUBERNETES_SERVICE_HOST is not set: the agent would reach the API server through a ClusterIP it programs itself")
	}
	if c.ReadinessProbe == nil || c.ReadinessProbe.HTTPGet == nil || c.ReadinessProbe.HTTPGet.Path != "/readyz" {
		t.Errorf("readiness probe = %+v, want GET /readyz", c.ReadinessProbe)
	}
	if c.LivenessProbe == nil || c.LivenessProbe.HTTPGet == nil || c.LivenessProbe.HTTPGet.Path != "/healthz" {
		t.Errorf("liveness probe = %+v, want GET /healthz", c.LivenessProbe)
	}
}

func fromUnstructured(t *testing.T, u *unstructured.Unstructured, into any) {
	t.Helper()
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, into); err != nil {
		t.Fatalf("%s %s: %v", u.GetKind(), u.GetName(), err)
	}
}

// grants flattens RBAC rules into "group/resource" -> sorted verbs, failing
// on wildcards and on rules scoped by resourceNames or URLs it cannot read.
func grants(t *testing.T, rules []rbacv1.PolicyRule) map[string][]string {
	t.Helper()
	out := map[string][]string{}
	for _, r := range rules {
		if len(r.NonResourceURLs) > 0 {
			t.Errorf("rule grants non-resource URLs %v", r.NonResourceURLs)
		}
		for _, g := range r.APIGroups {
			for _, res := range r.Resources {
				for _, v := range r.Verbs {
					if g == "*" || res == "*" || v == "*" {
						t.Errorf("rule uses a wildcard: %+v", r)
					}
					key := g + "/" + res
					if !slices.Contains(out[key], v) {
						out[key] = append(out[key], v)
					}
				}
			}
		}
	}
	for k := range out {
		slices.Sort(out[k])
	}
	return out
}

func mapsEqual(a, b map[string][]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, va := range a {
		vb := slices.Clone(b[k])
		slices.Sort(vb)
		if !slices.Equal(va, vb) {
			return false
		}
	}
	return true
}
