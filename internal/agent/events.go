package agent

import (
	"context"
	"slices"
	"strings"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/tools/events"
)

// problemReporter turns the parts of Services that could not be programmed
// into Warning Events on those Services: once per problem, not on every
// sync. Only the elected agent reports, so that a cluster of 5,000 nodes
// gives one Event per problem rather than 5,000.
type problemReporter struct {
	recorder events.EventRecorder
	// leading reports whether this agent may report now.
	leading func() bool
	// reported are the problems last seen per Service, reported or not.
	reported map[types.NamespacedName][]string
}

func newProblemReporter(recorder events.EventRecorder, leading func() bool) *problemReporter {
	return &problemReporter{recorder: recorder, leading: leading, reported: map[types.NamespacedName][]string{}}
}

func (p *problemReporter) afterSync(_ context.Context, r SyncResult) {
	keys := r.Changed
	if r.All {
		keys = keys[:0:0]
		for key := range r.Ruleset.Services {
			keys = append(keys, key)
		}
		for key := range p.reported {
			if _, ok := r.Ruleset.Services[key]; !ok {
				keys = append(keys, key)
			}
		}
	}
	leader := p.leading()
	for _, key := range keys {
		rules := r.Ruleset.Services[key]
		st, ok := r.Snapshot.Services[key]
		if rules == nil || !ok || len(rules.Problems) == 0 {
			delete(p.reported, key)
			continue
		}
		old := p.reported[key]
		p.reported[key] = rules.Problems
		if !leader {
			continue
		}
		for _, problem := range rules.Problems {
			if !slices.Contains(old, problem) {
				p.recorder.Eventf(st.Service, nil, corev1.EventTypeWarning, problemReason(problem), "Program", "%s", problem)
			}
		}
	}
}

// problemReason names the kind of problem from the field it starts with.
func problemReason(problem string) string {
	switch {
	case strings.Contains(problem, "also claimed by"):
		return "FrontendConflict"
	case strings.HasPrefix(problem, "spec.externalIPs"):
		return "ExternalIPNotProgrammed"
	case strings.HasPrefix(problem, "status.loadBalancer"):
		return "LoadBalancerIPNotProgrammed"
	case strings.HasPrefix(problem, "spec.loadBalancerSourceRanges"):
		return "SourceRangeNotProgrammed"
	case strings.HasPrefix(problem, "spec.ports"):
		return "PortNotProgrammed"
	case strings.HasPrefix(problem, "spec.clusterIP"):
		return "ClusterIPNotProgrammed"
	}
	return "NotFullyProgrammed"
}
