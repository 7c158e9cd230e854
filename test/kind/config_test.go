package kind_test

import (
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"

	"sigs.k8s.io/yaml"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// kindConfig is the part of kind's v1alpha4 Cluster config these tests read.
type kindConfig struct {
	Kind       string `json:"kind"`
	APIVersion string `json:"apiVersion"`
	Networking struct {
		KubeProxyMode string `json:"kubeProxyMode"`
		IPFamily      string `json:"ipFamily"`
		PodSubnet     string `json:"podSubnet"`
		ServiceSubnet string `json:"serviceSubnet"`
	} `json:"networking"`
	Nodes []struct {
		Role string `json:"role"`
	} `json:"nodes"`
}

// TestKindConfigs checks, without a cluster, that the kind configs give
// what the scenarios and the sample ProxyConfig assume: no kube-proxy, one
// control plane and two workers, and pod subnets that are the sample's
// clusterCIDRs.
func TestKindConfigs(t *testing.T) {
	var sample proxyv1alpha1.ProxyConfig
	readYAML(t, "../../config/samples/proxy_v1alpha1_proxyconfig.yaml", &sample)
	cidrs := make([]string, len(sample.Spec.ClusterCIDRs))
	for i, c := range sample.Spec.ClusterCIDRs {
		cidrs[i] = string(c)
	}

	for file, family := range map[string]string{"kind-config.yaml": "dual", "kind-config-ipv4.yaml": "ipv4"} {
		var cfg kindConfig
		readYAML(t, file, &cfg)
		if cfg.Kind != "Cluster" || cfg.APIVersion != "kind.x-k8s.io/v1alpha4" {
			t.Errorf("%s: kind %q apiVersion %q, want a kind.x-k8s.io/v1alpha4 Cluster", file, cfg.Kind, cfg.APIVersion)
		}
		n := cfg.Networking
		if n.KubeProxyMode != "none" {
			t.Errorf("%s: kubeProxyMode %q, want none: nftproxy must be the only service proxy", file, n.KubeProxyMode)
		}
		if n.IPFamily != family {
			t.Errorf("%s: ipFamily %q, want %s", file, n.IPFamily, family)
		}
		pods, services := strings.Split(n.PodSubnet, ","), strings.Split(n.ServiceSubnet, ",")
		want := 1
		if family == "dual" {
			want = 2
		}
		if len(pods) != want || len(services) != want {
			t.Errorf("%s: podSubnet %q, serviceSubnet %q: want %d of each", file, n.PodSubnet, n.ServiceSubnet, want)
		}
		for _, p := range pods {
			if !slices.Contains(cidrs, p) {
				t.Errorf("%s: pod subnet %s is not among the clusterCIDRs %v of config/samples", file, p, cidrs)
			}
		}
		if family == "dual" && !slices.Equal(pods, cidrs) {
			t.Errorf("%s: pod subnets %v, config/samples clusterCIDRs %v: want the same", file, pods, cidrs)
		}
		var roles []string
		for _, node := range cfg.Nodes {
			roles = append(roles, node.Role)
		}
		if !slices.Equal(roles, []string{"control-plane", "worker", "worker"}) {
			t.Errorf("%s: node roles %v, want one control-plane and two workers", file, roles)
		}
	}
}

// TestDockerfileGoVersion: the image builds with the Go release go.mod
// names, so that the build does not fetch another toolchain.
func TestDockerfileGoVersion(t *testing.T) {
	gomod, err := os.ReadFile("../../go.mod")
	if err != nil {
		t.Fatal(err)
	}
	dockerfile, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	want := regexp.MustCompile(`(?m)^go (\S+)$`).FindSubmatch(gomod)
	got := regexp.MustCompile(`(?m)^FROM golang:(\S+) AS build$`).FindSubmatch(dockerfile)
	if want == nil || got == nil {
		t.Fatalf("cannot find go.mod's go line (%q) or the Dockerfile's FROM golang:... AS build (%q)", want, got)
	}
	if string(got[1]) != string(want[1]) {
		t.Errorf("Dockerfile builds with golang:%s, go.mod says go %s", got[1], want[1])
	}
}

func readYAML(t *testing.T, path string, into any) {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.UnmarshalStrict(raw, into); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
}
