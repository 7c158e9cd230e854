package dataplane

import (
	"fmt"
	"net/netip"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/types"
)

// syntheticSnapshot builds n Services, each with one TCP port, a NodePort
// for every tenth, and epsPer ready endpoints, as a large cluster has.
func syntheticSnapshot(n, epsPer int) *Snapshot {
	snap := newSnapshot()
	for i := range n {
		snap.Services[syntheticKey(i)] = syntheticService(i, epsPer, 0)
	}
	return snap
}

func syntheticKey(i int) types.NamespacedName {
	return types.NamespacedName{Namespace: fmt.Sprintf("ns-%d", i%100), Name: fmt.Sprintf("svc-%d", i)}
}

// syntheticService is Service i; generation varies its endpoints so a
// benchmark can change one Service.
func syntheticService(i, epsPer, generation int) ServiceState {
	vip := netip.AddrFrom4([4]byte{10, 96 + byte(i>>16), byte(i >> 8), byte(i)})
	svc := service(fmt.Sprintf("ns-%d", i%100), fmt.Sprintf("svc-%d", i), []string{vip.String()}, []string{"http:80"})
	if i%10 == 0 {
		svc.Spec.Type = corev1.ServiceTypeNodePort
		svc.Spec.Ports[0].NodePort = int32(30000 + i/10%2768)
	}
	eps := make([]ep, epsPer)
	for j := range eps {
		k := i*epsPer + j + generation
		eps[j] = ready(netip.AddrFrom4([4]byte{10, 128 + byte(k>>16), byte(k >> 8), byte(k)}).String())
	}
	return state(svc, slice(svc, svc.Name+"-1", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, eps...))
}
