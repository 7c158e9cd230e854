//go:build !linux

package netnstest

import (
	"errors"
	"syscall"
)

// Network namespaces are Linux only; Require skips before these are used.
// They exist so that packages importing netnstest build everywhere.

func enterNetNS(string) (func() error, error) { return nil, errors.ErrUnsupported }

func processAlive(int) bool { return true }

func reportUnreachable(string, syscall.RawConn) error { return nil }
