package envtest_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/testenv"
)

// TestAgentBinary builds the real nftproxy binary, runs it against a real
// API server as the ServiceAccount that config/rbac grants, and checks that
// it becomes ready with no ProxyConfig, follows its ProxyConfig as it is
// created and deleted, and stops cleanly on SIGTERM.
func TestAgentBinary(t *testing.T) {
	netnstest.Require(t)
	env := testenv.Start(t)
	ctx := context.Background()
	binary := buildAgent(t)
	kubeconfigPath := deployedIdentity(t, env)

	// The agent programs a namespace of the test's, never this machine.
	node := netnstest.New(t, "node")
	healthAddress, metricsAddress := freeLoopbackAddress(t), freeLoopbackAddress(t)
	agent := startAgent(t, binary,
		"--kubeconfig", kubeconfigPath,
		"--node-name", "envtest-node",
		"--health-probe-bind-address", healthAddress,
		"--metrics-bind-address", metricsAddress,
		"--netns", node.Path(),
	)

	waitFor(t, 60*time.Second, "the agent to report ready", func() error {
		return httpOK("http://" + healthAddress + "/readyz")
	})
	if err := httpOK("http://" + healthAddress + "/healthz"); err != nil {
		t.Errorf("/healthz: %v", err)
	}
	if err := httpOK("http://" + metricsAddress + "/metrics"); err != nil {
		t.Errorf("/metrics: %v", err)
	}
	agent.waitForConfig(t, func(c loggedConfig) bool { return c.FromDefaults })
	if out, err := node.Run("nft", "list", "table", "inet", "nftproxy"); err != nil {
		t.Errorf("no nftproxy table in the agent's namespace once ready: %v: %s", err, out)
	}

	// Another node group's ProxyConfig must not be picked up.
	other := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "other"}}
	other.Spec.MasqueradeAll = true
	if err := env.Client.Create(ctx, other); err != nil {
		t.Fatal(err)
	}
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	pc.Spec.ClusterCIDRs = []proxyv1alpha1.CIDR{"10.244.0.0/16"}
	if err := env.Client.Create(ctx, pc); err != nil {
		t.Fatal(err)
	}
	got := agent.waitForConfig(t, func(c loggedConfig) bool { return !c.FromDefaults })
	if got.Generation != 1 || got.Spec.MasqueradeAll || len(got.Spec.ClusterCIDRs) != 1 {
		t.Errorf("agent runs %+v, want generation 1 of ProxyConfig default", got)
	}

	pc.Spec.MasqueradeAll = true
	if err := env.Client.Update(ctx, pc); err != nil {
		t.Fatal(err)
	}
	got = agent.waitForConfig(t, func(c loggedConfig) bool { return c.Generation == 2 })
	if !got.Spec.MasqueradeAll {
		t.Errorf("agent runs %+v after masqueradeAll was set", got)
	}

	if err := env.Client.Delete(ctx, pc); err != nil {
		t.Fatal(err)
	}
	agent.waitForConfig(t, func(c loggedConfig) bool { return c.FromDefaults && c.Spec.ClusterCIDRs == nil })

	if err := agent.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-agent.exited:
		if err != nil {
			t.Errorf("agent exited with %v after SIGTERM; output:\n%s", err, agent.output.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatalf("agent still running 30s after SIGTERM; output:\n%s", agent.output.String())
	}
	if !strings.Contains(agent.output.String(), "Stopped; the node's rules stay in place") {
		t.Errorf("no clean-stop line in the output:\n%s", agent.output.String())
	}
	if out, err := node.Run("nft", "list", "table", "inet", "nftproxy"); err != nil {
		t.Errorf("the rules did not survive SIGTERM: %v: %s", err, out)
	}

	// cleanup removes our table and nothing else.
	node.Exec(t, "nft", "add table inet cni; add chain inet cni forward { type filter hook forward priority 0; }")
	if out, err := exec.Command(binary, "cleanup", "--netns", node.Path()).CombinedOutput(); err != nil {
		t.Fatalf("nftproxy cleanup: %v: %s", err, out)
	}
	if out, err := node.Run("nft", "list", "table", "inet", "nftproxy"); err == nil {
		t.Errorf("our table survived cleanup:\n%s", out)
	}
	if out, err := node.Run("nft", "list", "chain", "inet", "cni", "forward"); err != nil {
		t.Errorf("cleanup touched another table: %v: %s", err, out)
	}
}

// TestAgentCommands checks the subcommands and flags that exit at once.
func TestAgentCommands(t *testing.T) {
	binary := buildAgent(t)
	for _, args := range [][]string{{"version"}, {"--version"}} {
		out, err := exec.Command(binary, args...).CombinedOutput()
		if err != nil || !strings.HasPrefix(string(out), "nftproxy ") {
			t.Errorf("nftproxy %v: %v: %q", args, err, out)
		}
	}
	for _, args := range [][]string{{"frobnicate"}, {"--no-such-flag"}, {"--config-name="}} {
		out, err := exec.Command(binary, args...).CombinedOutput()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() == 0 {
			t.Errorf("nftproxy %v: want a non-zero exit, got %v: %q", args, err, out)
		}
	}
}

var buildOnce struct {
	sync.Once
	path string
	err  error
	out  []byte
}

// buildAgent builds cmd/nftproxy once per test binary.
func buildAgent(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		dir, err := os.MkdirTemp("", "nftproxy-test-")
		if err != nil {
			buildOnce.err = err
			return
		}
		buildOnce.path = filepath.Join(dir, "nftproxy")
		cmd := exec.Command("go", "build", "-o", buildOnce.path, "./cmd/nftproxy")
		cmd.Dir = testenv.RepoRoot()
		buildOnce.out, buildOnce.err = cmd.CombinedOutput()
	})
	if buildOnce.err != nil {
		t.Fatalf("building nftproxy: %v\n%s", buildOnce.err, buildOnce.out)
	}
	return buildOnce.path
}

func TestMain(m *testing.M) {
	code := m.Run()
	if buildOnce.path != "" {
		_ = os.RemoveAll(filepath.Dir(buildOnce.path))
	}
	os.Exit(code)
}

// agentProcess is a running nftproxy with its combined output.
type agentProcess struct {
	cmd    *exec.Cmd
	output *lockedBuffer
	exited chan error
}

func startAgent(t *testing.T, binary string, args ...string) *agentProcess {
	t.Helper()
	a := &agentProcess{output: &lockedBuffer{}, exited: make(chan error, 1)}
	a.cmd = exec.Command(binary, args...)
	a.cmd.Stdout, a.cmd.Stderr = a.output, a.output
	if err := a.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { a.exited <- a.cmd.Wait() }()
	t.Cleanup(func() {
		if a.cmd.ProcessState == nil {
			_ = a.cmd.Process.Kill()
		}
		if t.Failed() {
			t.Logf("agent output:\n%s", a.output.String())
		}
	})
	return a
}

// loggedConfig is the agent's "Effective ProxyConfig changed" log line.
type loggedConfig struct {
	Name         string                        `json:"name"`
	FromDefaults bool                          `json:"fromDefaults"`
	Generation   int64                         `json:"generation"`
	Spec         proxyv1alpha1.ProxyConfigSpec `json:"spec"`
}

// waitForConfig waits for a log line announcing an effective configuration
// that satisfies match, and returns it.
func (a *agentProcess) waitForConfig(t *testing.T, match func(loggedConfig) bool) loggedConfig {
	t.Helper()
	var found loggedConfig
	waitFor(t, 30*time.Second, "the agent to log a matching effective ProxyConfig", func() error {
		scanner := bufio.NewScanner(strings.NewReader(a.output.String()))
		scanner.Buffer(make([]byte, 1<<20), 1<<20)
		for scanner.Scan() {
			var line struct {
				Msg string `json:"msg"`
				loggedConfig
			}
			if json.Unmarshal(scanner.Bytes(), &line) != nil || line.Msg != "Effective ProxyConfig changed" {
				continue
			}
			if line.Name != "default" {
				return fmt.Errorf("agent followed ProxyConfig %q", line.Name)
			}
			if match(line.loggedConfig) {
				found = line.loggedConfig
				return nil
			}
		}
		return errors.New("not logged yet")
	})
	return found
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

func freeLoopbackAddress(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	address := l.Addr().String()
	if err := l.Close(); err != nil {
		t.Fatal(err)
	}
	return address
}

func httpOK(url string) error {
	client := http.Client{Timeout: 2 * time.Second}
	resp, err := client.Get(url)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(resp.Body)
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %s: %s", url, resp.Status, body)
	}
	return nil
}

// waitFor polls check every 200ms until it succeeds or timeout passes.
func waitFor(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("timed out after %v waiting for %s: %v", timeout, what, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// deployedIdentity creates config/default's namespace and RBAC and returns
// a kubeconfig for the identity the DaemonSet runs as, granted exactly
// what the deployment grants.
func deployedIdentity(t *testing.T, env *testenv.Env) string {
	t.Helper()
	ctx := context.Background()
	objects := testenv.Kustomize(t, "config/default")
	for _, kinds := range [][]string{{"Namespace"}, {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}} {
		for _, o := range objects {
			if slices.Contains(kinds, o.GetKind()) {
				if err := env.Client.Create(ctx, o); err != nil {
					t.Fatalf("creating %s %s: %v", o.GetKind(), o.GetName(), err)
				}
			}
		}
	}
	user, err := env.AddUser(envtest.User{
		Name:   "system:serviceaccount:nftproxy-system:nftproxy",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:nftproxy-system", "system:authenticated"},
	}, nil)
	if err != nil {
		t.Fatal(err)
	}
	kubeconfig, err := user.KubeConfig()
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := os.WriteFile(path, kubeconfig, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}
