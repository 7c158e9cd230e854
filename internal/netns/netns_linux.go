package netns

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// Enter switches the calling thread, which the caller has locked, into
// the namespace pinned at path, and returns how to switch it back.
func Enter(path string) (restore func() error, err error) {
	orig, err := os.Open("/proc/thread-self/ns/net")
	if err != nil {
		return nil, err
	}
	target, err := os.Open(path)
	if err != nil {
		_ = orig.Close()
		return nil, fmt.Errorf("open network namespace: %w", err)
	}
	defer func() { _ = target.Close() }()
	if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
		_ = orig.Close()
		return nil, fmt.Errorf("enter network namespace %s: %w", path, err)
	}
	return func() error {
		defer func() { _ = orig.Close() }()
		return unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET)
	}, nil
}

// Do runs fn on a thread of its own switched into the namespace at path,
// and waits for it; goroutines fn starts run in the process's namespace.
// If the thread cannot be switched back it stays locked, so the Go
// runtime ends it rather than reuse it in the wrong namespace.
func Do(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restore, err := Enter(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		err = fn()
		if rerr := restore(); rerr != nil {
			errc <- errors.Join(err, fmt.Errorf("leave network namespace %s (thread discarded): %w", path, rerr))
			return
		}
		runtime.UnlockOSThread()
		errc <- err
	}()
	return <-errc
}

// ProcessAlive reports whether pid exists; EPERM means it exists but is
// not ours to signal.
func ProcessAlive(pid int) bool {
	err := unix.Kill(pid, 0)
	return err == nil || errors.Is(err, unix.EPERM)
}
