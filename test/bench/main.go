// Command bench measures the real nftproxy agent against a real API
// server in network namespaces it builds, at growing numbers of
// Services: cold start by traffic, the latency of single changes, the
// datapath against a direct connection, the agent's memory and CPU, and
// the netlink batch sizes. It prints Markdown tables with a verdict per
// aim and writes an SVG chart. It asserts nothing about time.
//
//	make bench                       (1k, 10k, 50k Services: about 10 minutes here)
//	make bench BENCH_SCALES=1000,10000   (about 4 minutes)
//	go run ./test/bench -scales 1000,10000,50000 -out bin/bench
//
// It needs root (network namespaces) and $KUBEBUILDER_ASSETS. It bounds
// its own run (-timeout), and removes what it created (namespaces, the
// agent and API server processes, temporary files) when it ends, fails or
// is interrupted; should it be killed, the next run removes the
// namespaces it left and its agents die with it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

func main() {
	var (
		scales   = flag.String("scales", envOr("BENCH_SCALES", "1000,10000,50000"), "Numbers of Services, comma-separated ($BENCH_SCALES).")
		baseline = flag.Int("baseline", 100, "A first, small scale for the datapath comparison (cold start, datapath, resources only); 0 skips it.")
		changes  = flag.Int("changes", 20, "Changes of each kind per scale.")
		samples  = flag.Int("datapath-samples", 2000, "Connections per path (ClusterIP, pod IP) per scale.")
		sample   = flag.Int("probe-sample", 200, "ClusterIPs the cold start waits for.")
		minSync  = flag.Duration("min-sync-interval", -1, "Write a ProxyConfig with this minSyncInterval; negative runs the agent with the defaults (1s).")
		agent    = flag.String("agent", "", "The nftproxy binary; built from ./cmd/nftproxy when empty.")
		out      = flag.String("out", "bin/bench", "Directory for report.md, chart.svg and results.json.")
		verbose  = flag.Bool("v", false, "Log every change's latency.")
		keepLogs = flag.String("keep-logs", "", "Copy the agents' logs into this directory.")
		fromJSON = flag.String("from-json", "", "Render the report of an earlier run's results.json instead of running.")
		timeout  = flag.Duration("timeout", 14*time.Minute, "Bound on the whole run.")
	)
	flag.Parse()
	if *fromJSON != "" {
		if err := rerender(*fromJSON, *out); err != nil {
			fail(err)
		}
		return
	}
	opts := options{
		BaselineScale: *baseline, Changes: *changes, DatapathSamples: *samples, ProbeSample: *sample,
		MinSyncInterval: *minSync, Agent: *agent, Verbose: *verbose, KeepLogs: *keepLogs,
		Log: func(format string, args ...any) {
			fmt.Fprintf(os.Stderr, "%s bench: %s\n", time.Now().Format("15:04:05.000"), fmt.Sprintf(format, args...))
		},
	}
	var err error
	if opts.Scales, err = parseScales(*scales); err != nil {
		fail(err)
	}
	if os.Geteuid() != 0 {
		fail(errors.New("needs root, to create network namespaces"))
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()

	res, err := runHarness(ctx, opts)
	if res != nil && len(res.Scales) > 0 {
		if werr := write(res, *out); werr != nil {
			err = errors.Join(err, werr)
		}
	}
	if err != nil {
		stop()
		fail(err)
	}
}

func write(res *results, dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	md := res.markdown("chart.svg")
	fmt.Print(md)
	raw, err := json.MarshalIndent(res, "", "  ")
	if err != nil {
		return err
	}
	for name, content := range map[string][]byte{"report.md": []byte(md), "chart.svg": []byte(res.svg()), "results.json": raw} {
		if err := os.WriteFile(filepath.Join(dir, name), content, 0o644); err != nil {
			return err
		}
	}
	fmt.Fprintf(os.Stderr, "bench: wrote %s/{report.md,chart.svg,results.json}\n", dir)
	return nil
}

// rerender writes the report of saved results again, as this version of
// the harness renders it.
func rerender(path, dir string) error {
	raw, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	var res results
	if err := json.Unmarshal(raw, &res); err != nil {
		return fmt.Errorf("%s: %w", path, err)
	}
	return write(&res, dir)
}

func parseScales(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n <= 0 {
			return nil, fmt.Errorf("bad scale %q in %q", f, s)
		}
		if len(out) > 0 && n <= out[len(out)-1] {
			return nil, fmt.Errorf("scales must grow: %q", s)
		}
		out = append(out, n)
	}
	return out, nil
}

func envOr(key, def string) string {
	if v := os.Getenv(key); v != "" {
		return v
	}
	return def
}

func fail(err error) {
	fmt.Fprintln(os.Stderr, "bench:", err)
	os.Exit(1)
}
