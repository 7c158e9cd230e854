package main

import (
	"bufio"
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
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// agentProcess is one run of the real nftproxy binary, programming the
// topology's node namespace. It is stopped by its PID, and dies with the
// harness (Pdeathsig) should the harness be killed.
type agentProcess struct {
	cmd         *exec.Cmd
	started     time.Time
	logPath     string
	metricsAddr string
	healthAddr  string
	exited      chan struct{}
	waitErr     error
}

func startAgent(binary, kubeconfig, netnsPath, logPath string) (*agentProcess, error) {
	metricsAddr, err := freeLoopbackAddress()
	if err != nil {
		return nil, err
	}
	healthAddr, err := freeLoopbackAddress()
	if err != nil {
		return nil, err
	}
	logFile, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer func() { _ = logFile.Close() }()
	cmd := exec.Command(binary,
		"--kubeconfig", kubeconfig,
		"--node-name", nodeName,
		"--netns", netnsPath,
		"--leader-elect=false",
		"--metrics-bind-address", metricsAddr,
		"--health-probe-bind-address", healthAddr,
		// V(1) logs one line per sync with its duration, which the
		// report breaks the cold start down with.
		"--zap-log-level=debug",
		"--zap-time-encoding=rfc3339nano",
	)
	cmd.Stdout, cmd.Stderr = logFile, logFile
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	a := &agentProcess{cmd: cmd, logPath: logPath, metricsAddr: metricsAddr, healthAddr: healthAddr, exited: make(chan struct{})}
	// Pdeathsig fires when the thread that forked the child ends, not
	// the process: Go ends threads whose goroutine exits locked (as the
	// probers' do). So fork from a thread of our own, locked until the
	// agent has exited.
	startErr := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		a.started = time.Now()
		if err := cmd.Start(); err != nil {
			startErr <- fmt.Errorf("starting %s: %w", binary, err)
			return
		}
		startErr <- nil
		a.waitErr = cmd.Wait()
		close(a.exited)
	}()
	if err := <-startErr; err != nil {
		return nil, err
	}
	return a, nil
}

// alive fails once the agent has exited.
func (a *agentProcess) alive() error {
	select {
	case <-a.exited:
		return fmt.Errorf("the agent exited: %w; log %s:\n%s", a.waitErr, a.logPath, tail(a.logPath, 20))
	default:
		return nil
	}
}

// stop sends SIGTERM and waits; SIGKILL after 15 s.
func (a *agentProcess) stop() {
	select {
	case <-a.exited:
		return
	default:
	}
	_ = a.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-a.exited:
	case <-time.After(15 * time.Second):
		_ = a.cmd.Process.Kill()
		<-a.exited
	}
}

// ready reports whether /readyz passes (after the first full sync).
func (a *agentProcess) ready() bool {
	c := http.Client{Timeout: time.Second}
	resp, err := c.Get("http://" + a.healthAddr + "/readyz")
	if err != nil {
		return false
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	_ = resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// metrics scrapes /metrics into series (name with labels) → value.
func (a *agentProcess) metrics(ctx context.Context) (map[string]float64, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, "http://"+a.metricsAddr+"/metrics", nil)
	if err != nil {
		return nil, err
	}
	resp, err := (&http.Client{Timeout: 5 * time.Second}).Do(req)
	if err != nil {
		return nil, err
	}
	defer func() { _ = resp.Body.Close() }()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("/metrics: status %d", resp.StatusCode)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		if i < 0 {
			continue
		}
		if v, err := strconv.ParseFloat(line[i+1:], 64); err == nil {
			out[line[:i]] = v
		}
	}
	return out, sc.Err()
}

// batch is the size of the agent's last netlink write.
type batch struct{ Bytes, Messages int }

func (a *agentProcess) lastBatch(ctx context.Context) (batch, error) {
	m, err := a.metrics(ctx)
	if err != nil {
		return batch{}, err
	}
	return batch{Bytes: int(m["nftproxy_sync_netlink_bytes"]), Messages: int(m["nftproxy_sync_netlink_messages"])}, nil
}

// usage is what the kernel accounts to the agent so far.
type usage struct {
	PeakRSSBytes int64   // VmHWM
	CPUSeconds   float64 // utime + stime
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat times: 100 on every
// Linux architecture the project builds for.
const clockTicks = 100

func (a *agentProcess) usage() (usage, error) {
	pid := a.cmd.Process.Pid
	var u usage
	status, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	for _, line := range strings.Split(string(status), "\n") {
		if rest, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			f := strings.Fields(rest) // "123456 kB"
			if len(f) == 2 {
				kb, _ := strconv.ParseInt(f[0], 10, 64)
				u.PeakRSSBytes = kb << 10
			}
		}
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return u, err
	}
	// Fields after the command name, which is in parentheses and may
	// hold spaces: state is field 3, utime 14, stime 15.
	i := strings.LastIndexByte(string(stat), ')')
	f := strings.Fields(string(stat)[i+1:])
	if len(f) < 13 {
		return u, fmt.Errorf("malformed /proc/%d/stat", pid)
	}
	utime, _ := strconv.ParseInt(f[11], 10, 64)
	stime, _ := strconv.ParseInt(f[12], 10, 64)
	u.CPUSeconds = float64(utime+stime) / clockTicks
	return u, nil
}

// logTimeline is what the agent's log tells of its cold start, relative
// to the process start.
type logTimeline struct {
	CachesSynced time.Duration // informers listed everything, Services loaded
	FirstWrite   time.Duration // the first sync's write returned
	FirstSync    time.Duration // that sync's compute + write, as it logs
	Services     int           // Service ports in that sync
}

// timeline reads the agent's JSON log.
func (a *agentProcess) timeline() (logTimeline, error) {
	f, err := os.Open(a.logPath)
	if err != nil {
		return logTimeline{}, err
	}
	defer func() { _ = f.Close() }()
	var tl logTimeline
	var cachesSeen, syncSeen bool
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		var line struct {
			TS       string `json:"ts"`
			Msg      string `json:"msg"`
			Duration string `json:"duration"`
			Services int    `json:"services"`
		}
		if json.Unmarshal(sc.Bytes(), &line) != nil {
			continue
		}
		ts, err := time.Parse(time.RFC3339Nano, line.TS)
		if err != nil {
			continue
		}
		switch {
		case !cachesSeen && strings.HasPrefix(line.Msg, "Caches synced"):
			tl.CachesSynced, cachesSeen = ts.Sub(a.started), true
		case !syncSeen && line.Msg == "Synced":
			tl.FirstWrite, syncSeen = ts.Sub(a.started), true
			tl.FirstSync, _ = time.ParseDuration(line.Duration)
			tl.Services = line.Services
		}
	}
	if err := sc.Err(); err != nil {
		return tl, err
	}
	if !cachesSeen || !syncSeen {
		return tl, errors.New("the agent's log has no \"Caches synced\" or \"Synced\" line")
	}
	return tl, nil
}

func freeLoopbackAddress() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", err
	}
	defer func() { _ = l.Close() }()
	return l.Addr().String(), nil
}

// tail is the last n lines of a file, for error messages.
func tail(path string, n int) string {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(raw), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

// buildAgent builds cmd/nftproxy into dir.
func buildAgent(ctx context.Context, repoRoot, dir string) (string, error) {
	out := filepath.Join(dir, "nftproxy")
	cmd := exec.CommandContext(ctx, "go", "build", "-o", out, "./cmd/nftproxy")
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if msg, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("building the agent: %w: %s", err, msg)
	}
	return out, nil
}
