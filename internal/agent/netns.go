package agent

import (
	"fmt"
	"net"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// listenInNetNS returns a listen function whose sockets live in the
// network namespace pinned at path: a socket stays in the namespace it was
// created in, so only its creation needs the thread switched there.
func listenInNetNS(path string) func(network, address string) (net.Listener, error) {
	return func(network, address string) (net.Listener, error) {
		var l net.Listener
		err := inNetNS(path, func() error {
			var err error
			l, err = net.Listen(network, address)
			return err
		})
		return l, err
	}
}

// inNetNS runs fn on a thread switched into the namespace at path. If the
// thread cannot be switched back it stays locked, so the Go runtime
// discards it rather than reuse it in the wrong namespace.
func inNetNS(path string, fn func() error) error {
	target, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open network namespace: %w", err)
	}
	defer func() { _ = target.Close() }()
	runtime.LockOSThread()
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		runtime.UnlockOSThread()
		return err
	}
	defer func() { _ = orig.Close() }()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		runtime.UnlockOSThread()
		return fmt.Errorf("enter network namespace %s: %w", path, err)
	}
	fnErr := fn()
	if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err != nil {
		return fmt.Errorf("leave network namespace %s: %w", path, err)
	}
	runtime.UnlockOSThread()
	return fnErr
}
