package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"time"

	"sigs.k8s.io/controller-runtime/pkg/envtest"
)

// Agent is one run of the nftproxy binary for a node. It is stopped by
// its PID, and dies with the process that started it (Pdeathsig).
type Agent struct {
	Node        *Node
	HealthAddr  string // /healthz and /readyz, on loopback
	MetricsAddr string // /metrics, on loopback
	LogPath     string // the agent's output; restarts append to it

	cmd    *exec.Cmd
	exited chan struct{}
	err    error
}

// StartAgent starts the node's agent, with its own kubeconfig (the
// DaemonSet's ServiceAccount identity, bound by config/rbac) and extra
// flags after the cluster's. It does not wait for readiness: WaitReady.
func (n *Node) StartAgent(extra ...string) error {
	if n.Agent != nil && n.Agent.Running() {
		return fmt.Errorf("%s: an agent is already running (pid %d)", n.Name, n.Agent.cmd.Process.Pid)
	}
	c := n.cluster
	if n.kubeconfig == "" {
		if err := n.writeKubeconfig(); err != nil {
			return err
		}
	}
	health, err := freeLoopbackAddress()
	if err != nil {
		return err
	}
	metrics, err := freeLoopbackAddress()
	if err != nil {
		return err
	}
	a := &Agent{Node: n, HealthAddr: health, MetricsAddr: metrics,
		LogPath: filepath.Join(c.dir, n.Name+".log"), exited: make(chan struct{})}
	log, err := os.OpenFile(a.LogPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer func() { _ = log.Close() }()
	args := append([]string{
		"--kubeconfig", n.kubeconfig,
		"--node-name", n.Name,
		"--netns", n.NS.Path(),
		"--health-probe-bind-address", health,
		"--metrics-bind-address", metrics,
		"--leader-election-namespace", "nftproxy-system",
		"--zap-encoder", "console",
	}, c.opts.AgentArgs...)
	args = append(args, extra...)
	a.cmd = exec.Command(c.opts.Agent, args...)
	a.cmd.Stdout, a.cmd.Stderr = log, log
	// Its own process group, so a Ctrl-C meant for the demo does not
	// reach it; Close stops it.
	a.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	// Pdeathsig fires when the thread that forked the child ends, and Go
	// ends threads whose goroutine exits locked (as netns.Do's do): fork
	// from a thread of our own, locked until the agent has exited.
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		if err := a.cmd.Start(); err != nil {
			started <- fmt.Errorf("%s: starting %s: %w", n.Name, c.opts.Agent, err)
			return
		}
		started <- nil
		a.err = a.cmd.Wait()
		close(a.exited)
	}()
	if err := <-started; err != nil {
		return err
	}
	n.Agent = a
	return nil
}

func (n *Node) writeKubeconfig() error {
	c := n.cluster
	user, err := c.Env.AddUser(envtest.User{
		Name:   "system:serviceaccount:nftproxy-system:nftproxy",
		Groups: []string{"system:serviceaccounts", "system:serviceaccounts:nftproxy-system", "system:authenticated"},
	}, nil)
	if err != nil {
		return err
	}
	raw, err := user.KubeConfig()
	if err != nil {
		return err
	}
	path := filepath.Join(c.dir, n.Name+".kubeconfig")
	if err := os.WriteFile(path, raw, 0o600); err != nil {
		return err
	}
	n.kubeconfig = path
	return nil
}

// Running reports whether the agent process is still running.
func (a *Agent) Running() bool {
	select {
	case <-a.exited:
		return false
	default:
		return true
	}
}

// Pid is the agent's process ID.
func (a *Agent) Pid() int { return a.cmd.Process.Pid }

// WaitReady waits until /readyz passes (the agent has written its first
// full ruleset), failing early, with the log's tail, if the agent exits.
func (a *Agent) WaitReady(ctx context.Context, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for {
		if !a.Running() {
			return fmt.Errorf("%s: the agent exited: %w; log %s:\n%s", a.Node.Name, a.err, a.LogPath, a.LogErrors(10))
		}
		if a.Probe("/readyz") == nil {
			return nil
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: the agent is not ready after %v; log %s:\n%s", a.Node.Name, timeout, a.LogPath, a.LogErrors(10))
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// Probe GETs path ("/readyz", "/healthz") from the agent's health server
// and fails unless it answers 200.
func (a *Agent) Probe(path string) error {
	resp, err := (&http.Client{Timeout: time.Second}).Get("http://" + a.HealthAddr + path)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
	_ = resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("%s: %d %s", path, resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return nil
}

// Kill ends the agent with SIGKILL, as an OOM kill or a crash would, and
// waits for it: its rules stay in the kernel.
func (a *Agent) Kill() {
	if a.Running() {
		_ = a.cmd.Process.Kill()
	}
	<-a.exited
}

// Stop sends SIGTERM and waits up to 30 s for a clean exit.
func (a *Agent) Stop() error {
	if !a.Running() {
		return a.err
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
		return a.err
	case <-time.After(30 * time.Second):
		a.Kill()
		return fmt.Errorf("%s: the agent did not stop within 30s of SIGTERM", a.Node.Name)
	}
}

// LogErrors is the first n error lines of the agent's log and its last
// line: what explains a failure, without the stack traces.
func (a *Agent) LogErrors(n int) string {
	raw, err := os.ReadFile(a.LogPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	var out []string
	for _, l := range lines {
		if len(out) < n && (strings.Contains(l, "\tERROR\t") || strings.HasPrefix(l, "E1") || strings.HasPrefix(l, "nftproxy:")) {
			out = append(out, l)
		}
	}
	return strings.Join(append(out, "…", lines[len(lines)-1]), "\n")
}

// LogTail is the last n lines of the agent's log, for error messages.
func (a *Agent) LogTail(n int) string {
	raw, err := os.ReadFile(a.LogPath)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// freeLoopbackAddress finds a free port for an agent's listener, below the
// ephemeral range (32768 and up): the kernel never hands those to outgoing
// connections, so the port stays free until the agent binds it, whatever
// connections are made meanwhile.
func freeLoopbackAddress() (string, error) {
	for range 100 {
		addr := fmt.Sprintf("127.0.0.1:%d", 20000+rand.IntN(12000))
		l, err := net.Listen("tcp", addr)
		if err != nil {
			continue
		}
		_ = l.Close()
		return addr, nil
	}
	return "", errors.New("no free port on 127.0.0.1 in 20000-31999")
}
