package netnstest

import (
	"syscall"

	"golang.org/x/sys/unix"
)

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
