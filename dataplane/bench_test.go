package dataplane

import (
	"context"
	"fmt"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

// Benchmarks at cluster scale: N Services with 4 endpoints each (a tenth
// with a NodePort), in two mixes: "core" (no policies) and "policies" (a
// third with session affinity, a tenth with a Local traffic policy). They
// print the figures the project aims at; they assert nothing about time,
// as these machines are shared.
//
//	go test -run XXX -bench . ./dataplane          (make bench)

var benchSizes = []int{1000, 10000, 50000}

var benchMixes = []struct {
	name     string
	policies bool
}{{"core", false}, {"policies", true}}

func BenchmarkCompute(b *testing.B) {
	for _, n := range benchSizes {
		for _, mix := range benchMixes {
			snap := syntheticSnapshot(n, 4, mix.policies)
			b.Run(fmt.Sprintf("services=%d/%s/cold", n, mix.name), func(b *testing.B) {
				for b.Loop() {
					Compute(snap)
				}
			})
		}
		snap := syntheticSnapshot(n, 4, false)
		b.Run(fmt.Sprintf("services=%d/one-change", n), func(b *testing.B) {
			c := NewComputer()
			c.Compute(snap)
			gen := 0
			for b.Loop() {
				gen++
				snap.Services[syntheticKey(7)] = syntheticService(7, 4, gen%3)
				c.ComputeChanged(snap, []types.NamespacedName{syntheticKey(7)})
			}
		})
	}
}

// BenchmarkKernelColdStart writes the whole table into an empty kernel
// (a fresh network namespace) in one transaction.
func BenchmarkKernelColdStart(b *testing.B) {
	netnstest.Require(b)
	for _, n := range benchSizes {
		for _, mix := range benchMixes {
			rs := Compute(syntheticSnapshot(n, 4, mix.policies))
			b.Run(fmt.Sprintf("services=%d/%s", n, mix.name), func(b *testing.B) {
				k, err := NewKernelApplier(WithNetNS(netnstest.New(b, "bench").Path()))
				if err != nil {
					b.Fatal(err)
				}
				defer func() { _ = k.Close() }()
				for b.Loop() {
					b.StopTimer()
					if err := k.Cleanup(context.Background()); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
					if err := k.Apply(context.Background(), rs); err != nil {
						b.Fatal(err)
					}
				}
				st := k.LastBatch()
				b.ReportMetric(float64(st.Messages), "msgs/op")
				b.ReportMetric(float64(st.Bytes)/(1<<20), "MiB/op")
			})
		}
	}
}

// BenchmarkKernelOneChange changes one Service on top of a full table:
// kinds "endpoint-replaced" (same count: map elements only),
// "endpoint-added" (the Service's rule changes) and "new-service"; with
// the policy mix also "affinity-endpoint-replaced" (an affinity Service's
// rules change, and the agent reads the affinity maps for stale entries).
func BenchmarkKernelOneChange(b *testing.B) {
	netnstest.Require(b)
	for _, n := range benchSizes {
		for _, mix := range benchMixes {
			kinds := []string{"endpoint-replaced", "endpoint-added", "new-service"}
			if mix.policies {
				kinds = []string{"endpoint-replaced", "new-service", "affinity-endpoint-replaced"}
			}
			for _, kind := range kinds {
				b.Run(fmt.Sprintf("services=%d/%s/%s", n, mix.name, kind), func(b *testing.B) {
					benchOneChange(b, n, mix.policies, kind)
				})
			}
		}
	}
}

func benchOneChange(b *testing.B, n int, policies bool, kind string) {
	snap := syntheticSnapshot(n, 4, policies)
	c := NewComputer()
	k, err := NewKernelApplier(WithNetNS(netnstest.New(b, "bench").Path()))
	if err != nil {
		b.Fatal(err)
	}
	defer func() { _ = k.Close() }()
	if err := k.Apply(context.Background(), c.Compute(snap)); err != nil {
		b.Fatal(err)
	}
	// Service 7 has no policy, 9 has affinity.
	var computeTime time.Duration
	i := 0
	for b.Loop() {
		i++
		switch kind {
		case "endpoint-replaced":
			snap.Services[syntheticKey(7)] = syntheticServiceWith(7, 4, i%2, policies)
		case "endpoint-added":
			snap.Services[syntheticKey(7)] = syntheticServiceWith(7, 4+i%2, 0, policies)
		case "affinity-endpoint-replaced":
			snap.Services[syntheticKey(9)] = syntheticServiceWith(9, 4, i%2, policies)
		case "new-service":
			if i%2 == 1 {
				snap.Services[syntheticKey(n)] = syntheticServiceWith(n, 4, 0, policies)
			} else {
				delete(snap.Services, syntheticKey(n))
			}
		}
		start := time.Now()
		rs := c.ComputeChanged(snap, []types.NamespacedName{syntheticKey(7), syntheticKey(9), syntheticKey(n)})
		computeTime += time.Since(start)
		if err := k.Apply(context.Background(), rs); err != nil {
			b.Fatal(err)
		}
	}
	b.ReportMetric(float64(computeTime.Microseconds())/float64(b.N), "compute-µs/op")
}
