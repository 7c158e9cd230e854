//go:build !linux

package netnstest

import (
	"syscall"
)

// Network namespaces are Linux only; Require skips before these are used.
// They exist so that packages importing netnstest build everywhere.

func reportUnreachable(string, syscall.RawConn) error { return nil }
