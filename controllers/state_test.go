package controllers

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/dataplane"
)

// TestSetServiceSkipsSameVersions: reading the same objects again (the
// reconcilers' first pass after the syncer loaded everything) is no
// change; a new version of the Service or of a slice is.
func TestSetServiceSkipsSameVersions(t *testing.T) {
	key := types.NamespacedName{Namespace: "ns", Name: "web"}
	svc := func(rv string) *corev1.Service {
		return &corev1.Service{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "web", ResourceVersion: rv}}
	}
	slice := func(name, rv string) *discoveryv1.EndpointSlice {
		return &discoveryv1.EndpointSlice{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: name, ResourceVersion: rv}}
	}
	s := NewState()
	pending := func() int { n, _ := s.Pending(); return n }

	s.SetService(key, dataplane.ServiceState{Service: svc("1"), Slices: []*discoveryv1.EndpointSlice{slice("a", "5"), slice("b", "6")}})
	s.Take()
	steps := []struct {
		name string
		st   dataplane.ServiceState
		want int
	}{
		{"same versions, slices in another order", dataplane.ServiceState{Service: svc("1"), Slices: []*discoveryv1.EndpointSlice{slice("b", "6"), slice("a", "5")}}, 0},
		{"a slice changed", dataplane.ServiceState{Service: svc("1"), Slices: []*discoveryv1.EndpointSlice{slice("a", "7"), slice("b", "6")}}, 1},
		{"the Service changed", dataplane.ServiceState{Service: svc("2"), Slices: []*discoveryv1.EndpointSlice{slice("a", "7"), slice("b", "6")}}, 1},
		{"a slice gone", dataplane.ServiceState{Service: svc("2"), Slices: []*discoveryv1.EndpointSlice{slice("a", "7")}}, 1},
		{"no versions (built by hand)", dataplane.ServiceState{Service: svc("")}, 1},
		{"no versions again", dataplane.ServiceState{Service: svc("")}, 1},
		{"deleted", dataplane.ServiceState{}, 1},
		{"deleted again", dataplane.ServiceState{}, 0},
	}
	for _, step := range steps {
		s.SetService(key, step.st)
		if got := pending(); got != step.want {
			t.Errorf("%s: %d pending, want %d", step.name, got, step.want)
		}
		s.Take()
	}
}
