// Command run-local runs the nftproxy agent against a throwaway local API
// server, for a machine with no cluster: it starts kube-apiserver and etcd
// from $KUBEBUILDER_ASSETS (`make run-local` builds them), installs the
// ProxyConfig CRD and the sample ProxyConfig, writes an admin kubeconfig to
// bin/local/kubeconfig and runs the agent until Ctrl-C, then removes it all.
//
// The agent programs a network namespace of its own (nftproxy-local-<pid>),
// never this machine's own ruleset, so it needs root (for `ip netns`).
//
//	go run ./hack/run-local [--agent bin/nftproxy] [-- agent flags...]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/test/testenv"
)

func main() {
	agent := flag.String("agent", "bin/nftproxy", "Path of the agent binary to run.")
	flag.Parse()
	if err := run(*agent, flag.Args()); err != nil {
		fmt.Fprintln(os.Stderr, "run-local:", err)
		os.Exit(1)
	}
}

func run(agentPath string, agentArgs []string) error {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		return errors.New("KUBEBUILDER_ASSETS is not set: use `make run-local`, which builds kube-apiserver and etcd")
	}
	env := testenv.NewEnvironment()
	if _, err := env.Start(); err != nil {
		return fmt.Errorf("starting the local API server: %w", err)
	}
	defer func() {
		if err := env.Stop(); err != nil {
			fmt.Fprintln(os.Stderr, "run-local: stopping the local API server:", err)
		}
	}()

	admin, err := env.AddUser(envtest.User{Name: "admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return fmt.Errorf("creating an admin user: %w", err)
	}
	kubeconfig, err := admin.KubeConfig()
	if err != nil {
		return fmt.Errorf("writing the admin kubeconfig: %w", err)
	}
	kubeconfigPath := filepath.Join(testenv.RepoRoot(), "bin", "local", "kubeconfig")
	if err := os.MkdirAll(filepath.Dir(kubeconfigPath), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(kubeconfigPath, kubeconfig, 0o600); err != nil {
		return err
	}
	defer func() { _ = os.Remove(kubeconfigPath) }()

	if err := createSample(admin.Config(), env.Scheme); err != nil {
		return err
	}

	netns := fmt.Sprintf("nftproxy-local-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", netns).CombinedOutput(); err != nil {
		return fmt.Errorf("creating network namespace %s (needs root): %w: %s", netns, err, out)
	}
	defer func() {
		if out, err := exec.Command("ip", "netns", "delete", netns).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "run-local: deleting network namespace %s: %v: %s\n", netns, err, out)
		}
	}()

	fmt.Printf("Local API server up. Try, in another shell:\n"+
		"  kubectl --kubeconfig %s get proxyconfigs\n"+
		"  kubectl --kubeconfig %s edit proxyconfig default   # the agent logs the change\n"+
		"  ip netns exec %s nft list table inet nftproxy     # the rules it wrote\n"+
		"Ctrl-C stops the agent and the API server.\n\n", kubeconfigPath, kubeconfigPath, netns)

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	args := append([]string{"--kubeconfig", kubeconfigPath, "--netns", "/run/netns/" + netns, "--leader-elect=false"}, agentArgs...)
	cmd := exec.Command(agentPath, args...)
	cmd.Stdout, cmd.Stderr = os.Stdout, os.Stderr
	// Its own process group: Ctrl-C reaches run-local, which stops the
	// agent with one SIGTERM (a second signal would make it exit at once).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("starting the agent: %w", err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	select {
	case err := <-exited:
		return fmt.Errorf("the agent exited: %w", err)
	case <-ctx.Done():
	}
	_ = cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		return err
	case <-time.After(30 * time.Second):
		_ = cmd.Process.Kill()
		return errors.New("the agent did not stop within 30s of SIGTERM")
	}
}

// createSample creates the sample ProxyConfig of config/samples.
func createSample(cfg *rest.Config, scheme *runtime.Scheme) error {
	raw, err := os.ReadFile(filepath.Join(testenv.RepoRoot(), "config", "samples", "proxy_v1alpha1_proxyconfig.yaml"))
	if err != nil {
		return err
	}
	var sample proxyv1alpha1.ProxyConfig
	if err := yaml.UnmarshalStrict(raw, &sample); err != nil {
		return fmt.Errorf("reading the sample ProxyConfig: %w", err)
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return err
	}
	if err := c.Create(context.Background(), &sample); err != nil {
		return fmt.Errorf("creating the sample ProxyConfig: %w", err)
	}
	// The agents' namespace, for their node reports (Leases).
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "nftproxy-system"}}
	if err := c.Create(context.Background(), ns); err != nil {
		return fmt.Errorf("creating namespace nftproxy-system: %w", err)
	}
	return nil
}
