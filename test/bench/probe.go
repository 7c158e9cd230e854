package main

import (
	"bytes"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"runtime"
	"time"

	"golang.org/x/sys/unix"

	"github.com/nftproxy/nftproxy/internal/netns"
)

// A prober makes TCP exchanges (connect, send one line, read the answer,
// close) from inside a namespace with plain blocking system calls on one
// OS thread that lives in that namespace. Nothing of Go's network poller
// or scheduler sits between the two clock readings, so the time measured
// is the kernel's path (plus the servers'), the same for a ClusterIP and
// for a pod IP.
type prober struct {
	jobs chan probeJob
	done chan struct{}
}

type probeJob struct {
	addr    netip.AddrPort
	timeout time.Duration
	result  chan probeResult
}

// probeResult is one exchange: who answered, when the SYN was about to
// be sent, and how long the whole exchange took.
type probeResult struct {
	server string
	start  time.Time
	took   time.Duration
	err    error
}

// newProber starts a prober in namespace ns. Its thread never leaves
// the namespace: it exits, locked, with the prober.
func newProber(ns string) (*prober, error) {
	p := &prober{jobs: make(chan probeJob), done: make(chan struct{})}
	ready := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with us
		defer close(p.done)
		if _, err := netns.Enter(netnsDir + "/" + ns); err != nil {
			ready <- fmt.Errorf("prober: entering %s: %w", ns, err)
			return
		}
		ready <- nil
		for j := range p.jobs {
			j.result <- exchange(j.addr, j.timeout)
		}
	}()
	if err := <-ready; err != nil {
		return nil, err
	}
	return p, nil
}

// probe makes one exchange with addr, bounded by timeout.
func (p *prober) probe(addr netip.AddrPort, timeout time.Duration) probeResult {
	res := make(chan probeResult, 1)
	p.jobs <- probeJob{addr: addr, timeout: timeout, result: res}
	return <-res
}

func (p *prober) close() {
	close(p.jobs)
	<-p.done
}

// exchange runs on the prober's thread. The socket lingers 0, so close
// resets the connection: no TIME_WAIT piles up over hundreds of
// thousands of probes, and the port is free at once.
func exchange(addr netip.AddrPort, timeout time.Duration) probeResult {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return probeResult{err: os.NewSyscallError("socket", err)}
	}
	tv := unix.NsecToTimeval(timeout.Nanoseconds())
	for _, opt := range []int{unix.SO_SNDTIMEO, unix.SO_RCVTIMEO} {
		if err := unix.SetsockoptTimeval(fd, unix.SOL_SOCKET, opt, &tv); err != nil {
			_ = unix.Close(fd)
			return probeResult{err: os.NewSyscallError("setsockopt", err)}
		}
	}
	if err := unix.SetsockoptLinger(fd, unix.SOL_SOCKET, unix.SO_LINGER, &unix.Linger{Onoff: 1, Linger: 0}); err != nil {
		_ = unix.Close(fd)
		return probeResult{err: os.NewSyscallError("setsockopt", err)}
	}
	start := time.Now()
	r := probeResult{start: start}
	r.server, r.err = talk(fd, addr)
	_ = unix.Close(fd)
	r.took = time.Since(start)
	return r
}

func talk(fd int, addr netip.AddrPort) (string, error) {
	sa := &unix.SockaddrInet4{Port: int(addr.Port()), Addr: addr.Addr().As4()}
	if err := unix.Connect(fd, sa); err != nil {
		if errors.Is(err, unix.EINPROGRESS) || errors.Is(err, unix.EAGAIN) {
			return "", fmt.Errorf("connect %s: timed out", addr)
		}
		return "", fmt.Errorf("connect %s: %w", addr, err)
	}
	if err := retryEINTR(func() error { _, err := unix.Write(fd, []byte("?\n")); return err }); err != nil {
		return "", fmt.Errorf("write %s: %w", addr, err)
	}
	var buf [64]byte
	n := 0
	for n < len(buf) {
		var m int
		err := retryEINTR(func() (err error) { m, err = unix.Read(fd, buf[n:]); return err })
		if err != nil {
			return "", fmt.Errorf("read %s: %w", addr, err)
		}
		if m == 0 {
			break
		}
		n += m
		if i := bytes.IndexByte(buf[:n], '\n'); i >= 0 {
			return string(buf[:i]), nil
		}
	}
	return "", fmt.Errorf("read %s: no answer line in %q", addr, buf[:n])
}

// retryEINTR retries a read or write a signal interrupted: with socket
// timeouts set, the kernel does not restart them (signal(7)). (A connect
// so interrupted fails the probe instead; the callers retry probes.)
func retryEINTR(fn func() error) error {
	for {
		if err := fn(); !errors.Is(err, unix.EINTR) {
			return err
		}
	}
}
