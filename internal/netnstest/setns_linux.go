package netnstest

import (
	"errors"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// enterNetNS switches the calling thread, which the caller has locked,
// into the namespace pinned at path, and returns how to switch it back.
func enterNetNS(path string) (restore func() error, err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err
	}
	target, err := os.Open(path)
	if err != nil {
		_ = orig.Close()
		return nil, err
	}
	defer func() { _ = target.Close() }()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		_ = orig.Close()
		return nil, err
	}
	return func() error {
		defer func() { _ = orig.Close() }()
		return unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET)
	}, nil
}

// processAlive reports whether pid exists; EPERM means it exists but is
// not ours to signal.
func processAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}

// reportUnreachable makes a UDP socket fail with EHOSTUNREACH or
// ENETUNREACH on an ICMP unreachable; by default Linux tells UDP sockets
// only of port and protocol unreachables, and a test would see a timeout.
func reportUnreachable(network string, c syscall.RawConn) error {
	level, opt := unix.IPPROTO_IP, unix.IP_RECVERR
	if network == "udp6" {
		level, opt = unix.IPPROTO_IPV6, unix.IPV6_RECVERR
	}
	var serr error
	if err := c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), level, opt, 1) }); err != nil {
		return err
	}
	return serr
}
