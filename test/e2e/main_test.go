// Package e2e runs nftproxy end to end: the real binary on every node of a
// cluster of network namespaces (test/e2e/cluster) with a real API server,
// and real packets from pods, nodes and clients outside the cluster. The
// scenarios follow the sig-network Service e2e suite. They share one
// cluster and run one at a time: some restart agents or the API server.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/e2e/cluster"
	"github.com/nftproxy/nftproxy/test/testenv"
)

var (
	shared     *cluster.Cluster
	sharedSkip string // why there is no cluster, when there is none
	agentPath  string
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	flag.Parse()
	switch {
	case os.Getenv("KUBEBUILDER_ASSETS") == "":
		sharedSkip = "KUBEBUILDER_ASSETS is not set: run `make test` (it builds kube-apiserver and etcd into bin/k8s)"
	case os.Geteuid() != 0:
		sharedSkip = "needs root, to create network namespaces"
	}
	if sharedSkip != "" {
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "nftproxy-e2e-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer func() { _ = os.RemoveAll(dir) }()
	agentPath = filepath.Join(dir, "nftproxy")
	build := exec.Command("go", "build", "-o", agentPath, "./cmd/nftproxy")
	build.Dir = testenv.RepoRoot()
	build.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := build.CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "building nftproxy: %v\n%s", err, out)
		return 1
	}
	opts := cluster.Options{Agent: agentPath, Nodes: 3, PodsPerNode: 2}
	if testing.Verbose() {
		opts.Log = os.Stderr
	}
	c, err := cluster.Start(context.Background(), opts)
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting the e2e cluster:", err)
		return 1
	}
	shared = c
	code := m.Run()
	if code != 0 {
		for _, n := range c.Nodes {
			fmt.Fprintf(os.Stderr, "--- %s agent log (errors and last line):\n%s\n", n.Name, n.Agent.LogErrors(20))
		}
	}
	if err := c.Close(); err != nil {
		fmt.Fprintln(os.Stderr, "closing the e2e cluster:", err)
		return 1
	}
	return code
}

// use returns the shared cluster, or skips (fails under CI) where it
// cannot run.
func use(t *testing.T) *cluster.Cluster {
	t.Helper()
	if shared == nil {
		if os.Getenv("CI") != "" && os.Geteuid() == 0 {
			t.Fatal(sharedSkip)
		}
		netnstest.Require(t) // the clearer reason, when it applies
		t.Skip(sharedSkip)
	}
	return shared
}
