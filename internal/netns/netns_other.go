//go:build !linux

package netns

import "errors"

// Network namespaces are Linux only; these let importers build anywhere.

// Enter fails: there are no network namespaces here.
func Enter(string) (func() error, error) { return nil, errors.ErrUnsupported }

// Do fails: there are no network namespaces here.
func Do(string, func() error) error { return errors.ErrUnsupported }

// ProcessAlive assumes every process is alive, so nothing is swept.
func ProcessAlive(int) bool { return true }
