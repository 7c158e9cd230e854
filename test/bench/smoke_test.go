package main

import (
	"context"
	"encoding/xml"
	"errors"
	"io"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestHarnessSmoke runs the whole harness at a tiny scale (20 Services,
// a few changes), so that `go test ./...` keeps it working. It checks
// that every figure was measured and that nothing the harness created is
// left behind; it asserts nothing about time.
func TestHarnessSmoke(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root, to create network namespaces")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("needs iproute2 (`ip`)")
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		msg := "KUBEBUILDER_ASSETS is not set: run `make test`"
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	const services, changes, samples = 20, 2, 100
	res, err := runHarness(ctx, options{
		Scales: []int{services}, Changes: changes, DatapathSamples: samples, ProbeSample: services,
		MinSyncInterval: 0, // no rate limit: the changes need not be spaced a second apart
		Log:             t.Logf,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Scales) != 1 {
		t.Fatalf("%d scales measured, want 1", len(res.Scales))
	}
	s := res.Scales[0]
	if s.Services != services || s.ProbedClusterIPs != services || s.ColdStart <= 0 || s.ColdStart < s.ColdFirstAnswer {
		t.Errorf("cold start not measured: %d Services, %d probed, cold start %v, first answer %v",
			s.Services, s.ProbedClusterIPs, s.ColdStart, s.ColdFirstAnswer)
	}
	if s.Timeline.Services == 0 || s.Timeline.FirstWrite <= 0 || s.InProcess.Compute <= 0 || s.InProcess.Batch.Messages == 0 {
		t.Errorf("cold start breakdown missing: log %+v, replay %+v", s.Timeline, s.InProcess)
	}
	if s.Usage.PeakRSSBytes == 0 || s.Usage.CPUSeconds == 0 {
		t.Errorf("usage %+v not measured", s.Usage)
	}
	for _, k := range changeKinds {
		c := s.Changes[k]
		if c == nil || len(c.Latencies) != changes || c.Failed != 0 || len(c.Batches) != changes {
			t.Errorf("%s: %+v, want %d visible changes with their batches", k, c, changes)
		}
	}
	if len(s.ClusterIP) != samples || len(s.Direct) != samples {
		t.Errorf("datapath: %d ClusterIP and %d direct samples, want %d each", len(s.ClusterIP), len(s.Direct), samples)
	}
	md := res.markdown("chart.svg")
	for _, want := range []string{"| 20 |", "#### Aims", "not measured"} {
		if !strings.Contains(md, want) {
			t.Errorf("report lacks %q:\n%s", want, md)
		}
	}
	dec := xml.NewDecoder(strings.NewReader(res.svg()))
	for {
		if _, err := dec.Token(); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("chart is not well-formed XML: %v", err)
		}
	}
	// Nothing left behind.
	entries, _ := os.ReadDir(netnsDir)
	for _, e := range entries {
		if m := benchNSName.FindStringSubmatch(e.Name()); m != nil && m[1] == strconv.Itoa(os.Getpid()) {
			t.Errorf("namespace %s left behind", e.Name())
		}
	}
}
