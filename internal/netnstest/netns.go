// Package netnstest builds small networks out of Linux network namespaces
// for tests that need a real kernel: namespaces joined by veth pairs, Go
// servers listening inside them and Go clients dialing from them, all in
// the test process, with no external server binaries.
//
// It keeps tests away from the machine they run on: it touches only the
// namespaces it creates (named "npx<pid>-<seq>-<role>"), sends traffic only
// inside them, never changes the root namespace, bounds every wait in
// time, and removes what it built in t.Cleanup, also when a test fails.
package netnstest

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/nftproxy/nftproxy/internal/netns"
)

const (
	// netnsDir is where `ip netns add` pins namespaces by name.
	netnsDir = netns.Dir
	// cmdTimeout bounds every command the package runs, so a wedged
	// `ip` or a command run by Exec cannot hang the test binary.
	cmdTimeout = 30 * time.Second
	// readyTimeout bounds the wait for links and addresses to be usable.
	readyTimeout = 5 * time.Second
	// linkIndexBase is where Link's explicit ifindexes start.
	linkIndexBase = 10000
)

var (
	nsSeq   atomic.Int64 // makes namespace names unique in the process
	linkSeq atomic.Int64 // makes veth names unique in the process

	requireOnce sync.Once
	requireErr  error // why the package cannot work here, or nil
)

// Require skips the test unless it runs as root on Linux with iproute2's
// `ip` in PATH and creating a network namespace works, so kernel tests
// skip with a clear reason on a developer laptop instead of failing. The
// check runs once per process; New calls it too.
func Require(t testing.TB) {
	t.Helper()
	requireOnce.Do(func() {
		requireErr = probe()
		if requireErr == nil {
			if n := netns.SweepStale(staleName); n > 0 {
				t.Logf("netnstest: removed %d namespaces left behind by dead test processes", n)
			}
		}
	})
	if requireErr != nil {
		t.Skipf("netnstest: %v", requireErr)
	}
}

func probe() error {
	if runtime.GOOS != "linux" {
		return fmt.Errorf("needs Linux network namespaces, running on %s", runtime.GOOS)
	}
	if uid := os.Geteuid(); uid != 0 {
		return fmt.Errorf("needs root to create network namespaces (euid %d)", uid)
	}
	if _, err := exec.LookPath("ip"); err != nil {
		return errors.New("needs iproute2 (`ip`) in PATH")
	}
	name := newName("probe")
	if _, err := run("ip", "netns", "add", name); err != nil {
		return fmt.Errorf("cannot create a network namespace: %w", err)
	}
	if _, err := run("ip", "netns", "del", name); err != nil {
		return fmt.Errorf("cannot remove network namespace %s: %w", name, err)
	}
	return nil
}

// staleName matches the names newName makes and captures the creator's pid.
var staleName = regexp.MustCompile(`^npx([0-9]+)-[0-9]+-`)

// newName returns "npx<pid>-<seq>-<role>": the pid lets netns.SweepStale find
// leftovers of dead processes, the sequence number keeps names unique.
func newName(role string) string {
	clean := strings.Map(func(r rune) rune {
		if r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '-' {
			return r
		}
		return -1
	}, role)
	if len(clean) > 12 {
		clean = clean[:12]
	}
	if clean == "" {
		clean = "ns"
	}
	return fmt.Sprintf("npx%d-%d-%s", os.Getpid(), nsSeq.Add(1), clean)
}

// NS is a network namespace created by the test and removed at its
// cleanup.
type NS struct {
	Name string // as in `ip netns list`
}

// New creates a namespace with lo up and IPv6 duplicate address detection
// off (so addresses added later are usable at once), and registers its
// removal with t.Cleanup. It skips the test, via Require, where namespaces
// cannot be created.
func New(t testing.TB, role string) *NS {
	t.Helper()
	Require(t)
	ns := &NS{Name: newName(role)}
	mustRun(t, "ip", "netns", "add", ns.Name)
	t.Cleanup(func() {
		if _, err := run("ip", "netns", "del", ns.Name); err != nil {
			t.Errorf("netnstest: removing namespace: %v", err)
		}
	})
	ns.IP(t, "link", "set", "lo", "up")
	ns.sysctls(t,
		"net.ipv6.conf.all.accept_dad", "0",
		"net.ipv6.conf.default.accept_dad", "0")
	return ns
}

// Path is the namespace's pinned file, for APIs that take a namespace
// file descriptor (nftables.WithNetNSFd, netlink).
func (ns *NS) Path() string { return netnsDir + "/" + ns.Name }

// String returns the namespace's name, for messages.
func (ns *NS) String() string { return ns.Name }

// Run runs argv inside the namespace (`ip netns exec`) and returns its
// standard output; the error carries the command line and all output.
// Use it when failure is an expected outcome; Exec otherwise.
func (ns *NS) Run(argv ...string) (string, error) { return run(ns.inside(argv)...) }

// Exec is Run that fails the test, with the command's output, when the
// command fails.
func (ns *NS) Exec(t testing.TB, argv ...string) string {
	t.Helper()
	return mustRun(t, ns.inside(argv)...)
}

// inside is the command line running argv inside the namespace.
func (ns *NS) inside(argv []string) []string {
	return append([]string{"ip", "netns", "exec", ns.Name}, argv...)
}

// IP runs `ip -n <name> args...`, failing the test when it fails, and
// returns its output (useful with "-j" for JSON).
func (ns *NS) IP(t testing.TB, args ...string) string {
	t.Helper()
	return mustRun(t, append([]string{"ip", "-n", ns.Name}, args...)...)
}

// Sysctl sets a sysctl inside the namespace. key is dotted
// ("net.ipv4.ip_forward") or a path below /proc/sys (needed when a part
// contains a dot, as VLAN interface names do).
func (ns *NS) Sysctl(t testing.TB, key, value string) {
	t.Helper()
	ns.sysctls(t, key, value)
}

// sysctls is SetSysctls that fails the test.
func (ns *NS) sysctls(t testing.TB, kv ...string) {
	t.Helper()
	if err := ns.SetSysctls(kv...); err != nil {
		t.Fatalf("netnstest: %v", err)
	}
}

// SetSysctls sets key/value pairs inside the namespace with a single
// process, for code without a testing.TB: the net sysctls under /proc/sys
// belong to the namespace of the process opening them, so they are
// written from a shell started inside the namespace. Keys are dotted or
// paths below /proc/sys, as for Sysctl; keys and values are passed as
// arguments, never spliced into the script.
func (ns *NS) SetSysctls(kv ...string) error {
	if len(kv)%2 != 0 {
		return fmt.Errorf("sysctls wants key/value pairs, got %q", kv)
	}
	args := []string{"sh", "-c", `while [ $# -gt 1 ]; do printf '%s\n' "$2" > "/proc/sys/$1" || exit 1; shift 2; done`, "sh"}
	for i := 0; i < len(kv); i += 2 {
		key := kv[i]
		if !strings.Contains(key, "/") {
			key = strings.ReplaceAll(key, ".", "/")
		}
		args = append(args, strings.TrimPrefix(key, "/proc/sys/"), kv[i+1])
	}
	_, err := ns.Run(args...)
	return err
}

// Do runs fn on an OS thread switched into the namespace, so that sockets
// fn creates belong to the namespace; they keep working after Do returns,
// from any goroutine. Keep fn short: create sockets in it, do their I/O
// after Do. fn runs on a goroutine of its own, locked to its thread, so
// goroutines it starts run in the process's namespace. fn reports failure
// by returning an error; should it panic or call t.FailNow anyway, the
// panic or the exit is passed on to the caller's goroutine.
//
// The caller's thread is never switched. If switching fn's thread back
// fails, the thread stays locked, so the runtime ends it with its
// goroutine instead of reusing it in the wrong namespace.
func (ns *NS) Do(fn func() error) error {
	type outcome struct {
		err      error
		finished bool // fn returned (rather than panicking or exiting)
		panicked any
	}
	done := make(chan outcome, 1)
	go func() {
		runtime.LockOSThread()
		var out outcome
		restore, err := netns.Enter(ns.Path())
		if err != nil {
			runtime.UnlockOSThread()
			done <- outcome{err: fmt.Errorf("netnstest: entering %s: %w", ns.Name, err), finished: true}
			return
		}
		defer func() {
			if !out.finished {
				out.panicked = recover()
			}
			if err := restore(); err != nil {
				out.err = errors.Join(out.err, fmt.Errorf("netnstest: leaving %s (thread discarded): %w", ns.Name, err))
			} else {
				runtime.UnlockOSThread()
			}
			done <- out
		}()
		out.err = fn()
		out.finished = true
	}()
	out := <-done
	switch {
	case out.panicked != nil:
		panic(out.panicked)
	case !out.finished:
		runtime.Goexit() // fn called t.FailNow or t.SkipNow: finish it here
	}
	return out.err
}

// Link joins a and b with a veth pair, adds the addresses (CIDR form,
// "10.0.0.1/24", "fd00::1/64") to each end, brings both up and waits until
// they carry traffic. It returns the interface names, generated unique in
// the process and short enough for the 15-character limit.
func Link(t testing.TB, a *NS, aAddrs []string, b *NS, bAddrs []string) (aIf, bIf string) {
	t.Helper()
	n := linkSeq.Add(1)
	aIf, bIf = fmt.Sprintf("v%da", n), fmt.Sprintf("v%db", n)
	// Created from inside a with its peer placed straight into b: the
	// root namespace never holds either end. The ends get distinct
	// ifindexes, far above those the kernel hands out: in fresh namespaces
	// both would get ifindex 2, and the kernel's linkwatch treats a veth
	// whose ifindex equals its peer's like a non-stacked device, applying
	// its carrier change up to a second late (operstate DOWN meanwhile),
	// which made every Link wait about a second.
	index := func(end int64) string { return strconv.FormatInt(linkIndexBase+2*n+end, 10) }
	a.IP(t, "link", "add", aIf, "index", index(0), "type", "veth",
		"peer", "name", bIf, "index", index(1), "netns", b.Name)
	a.setUp(t, aIf, aAddrs)
	b.setUp(t, bIf, bAddrs)
	a.WaitReady(t)
	b.WaitReady(t)
	return aIf, bIf
}

// setUp adds addresses to dev and brings it up. IPv6 addresses get nodad,
// so they skip duplicate address detection and are usable immediately.
func (ns *NS) setUp(t testing.TB, dev string, addrs []string) {
	t.Helper()
	for _, a := range addrs {
		p, err := netip.ParsePrefix(a)
		if err != nil {
			t.Fatalf("netnstest: address %q for %s in %s: want CIDR form: %v", a, dev, ns.Name, err)
		}
		args := []string{"addr", "add", p.String(), "dev", dev}
		if p.Addr().Is6() {
			args = append(args, "nodad")
		}
		ns.IP(t, args...)
	}
	ns.IP(t, "link", "set", dev, "up")
}

// run runs argv, bounded by cmdTimeout, and returns its standard output.
// The error names the command and carries all of its output.
func run(argv ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay = time.Second
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if ctx.Err() != nil {
		err = fmt.Errorf("timed out after %v: %w", cmdTimeout, err)
	}
	if err != nil {
		return stdout.String(), fmt.Errorf("%s: %w\n%s%s", strings.Join(argv, " "), err, stderr.Bytes(), stdout.Bytes())
	}
	return stdout.String(), nil
}

// mustRun is run that fails the test on error.
func mustRun(t testing.TB, argv ...string) string {
	t.Helper()
	out, err := run(argv...)
	if err != nil {
		t.Fatalf("netnstest: %v", err)
	}
	return out
}
