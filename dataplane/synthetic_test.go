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
// With policies, Services also carry the policy mix of syntheticPolicies.
func syntheticSnapshot(n, epsPer int, policies bool) *Snapshot {
	snap := newSnapshot()
	for i := range n {
		snap.Services[syntheticKey(i)] = syntheticServiceWith(i, epsPer, 0, policies)
	}
	return snap
}

func syntheticKey(i int) types.NamespacedName {
	return types.NamespacedName{Namespace: fmt.Sprintf("ns-%d", i%100), Name: fmt.Sprintf("svc-%d", i)}
}

// syntheticService is Service i; generation varies its endpoints so a
// benchmark can change one Service.
func syntheticService(i, epsPer, generation int) ServiceState {
	return syntheticServiceWith(i, epsPer, generation, false)
}

// syntheticServiceWith is syntheticService with, when policies is set, the
// policy mix: ClientIP affinity on every third Service, and Local traffic
// policies on every tenth (externalTrafficPolicy on half of those, which
// have a NodePort, internalTrafficPolicy on the other half); half of each
// Service's endpoints are on this node.
func syntheticServiceWith(i, epsPer, generation int, policies bool) ServiceState {
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
		if policies && j%2 == 1 {
			eps[j].node = otherNode
		}
	}
	if policies {
		if i%3 == 0 {
			withAffinity(defaultAffinityTimeout)(svc)
		}
		switch i % 20 {
		case 0:
			withExternalPolicyLocal()(svc)
		case 10:
			withInternalPolicyLocal()(svc)
		}
	}
	return state(svc, slice(svc, svc.Name+"-1", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, eps...))
}
