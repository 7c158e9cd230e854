// Package netns runs code inside a network namespace pinned at a path
// (for example /run/netns/NAME): sockets belong to the namespace of the
// thread that creates them and stay there, so only their creation needs
// the thread switched. The agent opens its health check listeners this
// way under --netns; the test harnesses build their networks with it.
package netns

import (
	"context"
	"os"
	"os/exec"
	"regexp"
	"strconv"
	"time"
)

// Dir is where `ip netns` pins named namespaces.
const Dir = "/run/netns"

// SweepStale deletes the namespaces in Dir whose names match pattern and
// whose creator is gone: pattern's first group is the creator's PID. A
// killed process runs no cleanup; namespaces of live processes, and every
// name pattern does not match, are left alone. It returns how many it
// deleted.
func SweepStale(pattern *regexp.Regexp) int {
	entries, err := os.ReadDir(Dir)
	if err != nil {
		return 0
	}
	n := 0
	for _, e := range entries {
		m := pattern.FindStringSubmatch(e.Name())
		if len(m) < 2 {
			continue
		}
		pid, err := strconv.Atoi(m[1])
		if err != nil || pid == os.Getpid() || ProcessAlive(pid) {
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		err = exec.CommandContext(ctx, "ip", "netns", "delete", e.Name()).Run()
		cancel()
		if err == nil {
			n++
		}
	}
	return n
}
