package e2e

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"

	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

// TestTopologyPreferClose: with trafficDistribution PreferClose and every
// endpoint hinted for its zone, a pod reaches only the endpoints of its
// own zone; a node whose zone no endpoint is hinted for uses them all, and
// once one endpoint loses its hint every node uses them all again (the
// hints apply only when every endpoint has them).
func TestTopologyPreferClose(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	zoneA, zoneB := c.Nodes[0], c.Nodes[1]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "zonal"},
		Spec: corev1.ServiceSpec{
			Ports:               []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))},
			TrafficDistribution: ptr.To(corev1.ServiceTrafficDistributionPreferClose),
		},
	})
	hinted := func(p *cluster.Pod) cluster.Endpoint {
		return cluster.Endpoint{Pod: p, State: cluster.Ready, ForZones: []string{p.Node.Zone}}
	}
	setEndpoints(t, c, svc, []cluster.Endpoint{hinted(zoneA.Pods[0]), hinted(zoneA.Pods[1]), hinted(zoneB.Pods[0])})
	vip := hostPort(svc.Spec.ClusterIP, 80)

	reaches(t, "a pod in "+zoneA.Zone, askTCP(zoneA.Pods[1].NS, vip), zoneA.Pods[0], zoneA.Pods[1])
	onlyReaches(t, "a pod in "+zoneA.Zone, askTCP(zoneA.Pods[1].NS, vip), 20, zoneA.Pods[0], zoneA.Pods[1])
	reaches(t, "a pod in "+zoneB.Zone, askTCP(zoneB.Pods[1].NS, vip), zoneB.Pods[0])
	onlyReaches(t, "a pod in "+zoneB.Zone, askTCP(zoneB.Pods[1].NS, vip), 20, zoneB.Pods[0])
	far := c.Nodes[2]
	reaches(t, "a pod in "+far.Zone+", which no endpoint is hinted for", askTCP(far.Pods[0].NS, vip),
		zoneA.Pods[0], zoneA.Pods[1], zoneB.Pods[0])

	// One endpoint without hints: the hints no longer apply anywhere.
	setEndpoints(t, c, svc, []cluster.Endpoint{hinted(zoneA.Pods[0]), hinted(zoneA.Pods[1]), {Pod: zoneB.Pods[0], State: cluster.Ready}})
	reaches(t, "a pod in "+zoneA.Zone+" once an endpoint has no hint", askTCP(zoneA.Pods[1].NS, vip),
		zoneA.Pods[0], zoneA.Pods[1], zoneB.Pods[0])
}
