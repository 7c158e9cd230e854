package cluster

import (
	"context"
	"fmt"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// Endpoint is a pod behind a Service, in one of the states a pod goes
// through: Ready (serving, not terminating), Unready (starting or failing
// its probe), Terminating (deleted, still serving its last requests) or
// TerminatingUnready (deleted and no longer serving).
type Endpoint struct {
	Pod   *Pod
	State EndpointState
	// ForZones, when set, are the endpoint's topology hints, as the
	// EndpointSlice controller writes them for trafficDistribution
	// PreferClose.
	ForZones []string
}

// EndpointState is an endpoint's conditions, as the endpoint controller
// derives them from the pod.
type EndpointState int

const (
	Ready EndpointState = iota
	Unready
	Terminating
	TerminatingUnready
)

func (s EndpointState) conditions() discoveryv1.EndpointConditions {
	ready, serving, terminating := false, false, false
	switch s {
	case Ready:
		ready, serving = true, true
	case Terminating:
		serving, terminating = true, true
	case TerminatingUnready:
		terminating = true
	}
	return discoveryv1.EndpointConditions{Ready: &ready, Serving: &serving, Terminating: &terminating}
}

// ReadyPods is the pods as ready endpoints.
func ReadyPods(pods ...*Pod) []Endpoint {
	eps := make([]Endpoint, len(pods))
	for i, p := range pods {
		eps[i] = Endpoint{Pod: p, State: Ready}
	}
	return eps
}

// SetEndpoints writes the EndpointSlices of svc (as read back from the API
// server: its IP families decide the slices) so that they hold exactly
// eps, with ports resolved as the endpoint controller resolves them:
// a numeric targetPort as is, a named one against the pods' PodPorts, none
// as the Service port. One slice per IP family, created or replaced.
func (c *Cluster) SetEndpoints(ctx context.Context, svc *corev1.Service, eps []Endpoint) error {
	families := svc.Spec.IPFamilies
	if len(families) == 0 {
		families = []corev1.IPFamily{corev1.IPv4Protocol}
	}
	var ports []discoveryv1.EndpointPort
	for _, sp := range svc.Spec.Ports {
		port, err := targetPort(sp)
		if err != nil {
			return fmt.Errorf("service %s/%s: %w", svc.Namespace, svc.Name, err)
		}
		ports = append(ports, discoveryv1.EndpointPort{Name: ptr.To(sp.Name), Port: ptr.To(port), Protocol: ptr.To(sp.Protocol)})
	}
	for _, family := range families {
		slice := &discoveryv1.EndpointSlice{
			ObjectMeta: metav1.ObjectMeta{
				Namespace: svc.Namespace,
				Name:      fmt.Sprintf("%s-%s", svc.Name, map[corev1.IPFamily]string{corev1.IPv4Protocol: "ipv4", corev1.IPv6Protocol: "ipv6"}[family]),
				Labels: map[string]string{
					discoveryv1.LabelServiceName: svc.Name,
					discoveryv1.LabelManagedBy:   "e2e.nftproxy.io",
				},
			},
			AddressType: discoveryv1.AddressType(family),
			Ports:       ports,
		}
		for _, ep := range eps {
			addr := ep.Pod.IPv4
			if family == corev1.IPv6Protocol {
				addr = ep.Pod.IPv6
			}
			slice.Endpoints = append(slice.Endpoints, discoveryv1.Endpoint{
				Addresses:  []string{addr.String()},
				Conditions: ep.State.conditions(),
				NodeName:   ptr.To(ep.Pod.Node.Name),
				Zone:       ptr.To(ep.Pod.Node.Zone),
				TargetRef:  &corev1.ObjectReference{Kind: "Pod", Namespace: svc.Namespace, Name: ep.Pod.Name},
				Hints:      hints(ep.ForZones),
			})
		}
		if err := c.apply(ctx, slice); err != nil {
			return fmt.Errorf("writing EndpointSlice %s/%s: %w", slice.Namespace, slice.Name, err)
		}
	}
	return nil
}

// apply creates slice, or replaces the existing one.
func (c *Cluster) apply(ctx context.Context, slice *discoveryv1.EndpointSlice) error {
	err := c.API.Create(ctx, slice)
	if !apierrors.IsAlreadyExists(err) {
		return err
	}
	var old discoveryv1.EndpointSlice
	if err := c.API.Get(ctx, client.ObjectKeyFromObject(slice), &old); err != nil {
		return err
	}
	slice.ResourceVersion = old.ResourceVersion
	return c.API.Update(ctx, slice)
}

func targetPort(sp corev1.ServicePort) (int32, error) {
	switch {
	case sp.TargetPort.Type == intstr.String && sp.TargetPort.StrVal != "":
		port, ok := PodPorts[string(sp.Protocol)][sp.TargetPort.StrVal]
		if !ok {
			return 0, fmt.Errorf("port %s: the pods have no %s port named %q", sp.Name, sp.Protocol, sp.TargetPort.StrVal)
		}
		return port, nil
	case sp.TargetPort.IntVal != 0:
		return sp.TargetPort.IntVal, nil
	default:
		return sp.Port, nil
	}
}

func hints(zones []string) *discoveryv1.EndpointHints {
	if len(zones) == 0 {
		return nil
	}
	h := &discoveryv1.EndpointHints{}
	for _, z := range zones {
		h.ForZones = append(h.ForZones, discoveryv1.ForZone{Name: z})
	}
	return h
}
