package cluster

import (
	"bytes"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"github.com/nftproxy/nftproxy/internal/netns"
)

// A cluster's working directory holds ownerFile, the PID of the process
// that started it. kube-apiserver and etcd run with their certificates and
// data in that directory, so if that process dies without Close (a test
// that panics, a timeout), the next Start finds them by it: sweepStale
// kills those processes, by PID, and removes the directory. Namespaces of
// dead runs are swept by name (staleNames). Nothing of a live run, and
// nothing this package did not start, is touched.
const ownerFile = "owner.pid"

func sweepStale() {
	dirs, _ := filepath.Glob(filepath.Join(os.TempDir(), "nftproxy-e2e-*"))
	for _, dir := range dirs {
		raw, err := os.ReadFile(filepath.Join(dir, ownerFile))
		if err != nil {
			continue
		}
		owner, err := strconv.Atoi(strings.TrimSpace(string(raw)))
		if err != nil || owner == os.Getpid() || netns.ProcessAlive(owner) {
			continue
		}
		for _, pid := range processesUsing(dir + string(filepath.Separator)) {
			_ = syscall.Kill(pid, syscall.SIGKILL)
		}
		_ = os.RemoveAll(dir)
	}
}

// processesUsing lists the processes with an argument under dir.
func processesUsing(dir string) []int {
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	var pids []int
	for _, p := range procs {
		cmdline, err := os.ReadFile(p)
		if err != nil || !bytes.Contains(cmdline, []byte(dir)) {
			continue
		}
		if pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p))); err == nil && pid != os.Getpid() {
			pids = append(pids, pid)
		}
	}
	return pids
}
