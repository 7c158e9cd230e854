package e2e

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

// TestClusterIPFromPodAndNode: a ClusterIP Service with endpoints on two
// nodes is reached from a pod and from every node, spread over all the
// endpoints, and a pod's source address reaches the backend unchanged.
func TestClusterIPFromPodAndNode(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backends := []*cluster.Pod{c.Nodes[0].Pods[0], c.Nodes[1].Pods[0], c.Nodes[1].Pods[1]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	vip := hostPort(svc.Spec.ClusterIP, 80)

	client := c.Nodes[2].Pods[0]
	seen := reaches(t, "pod to ClusterIP", askTCP(client.NS, vip), backends...)
	for name, r := range seen {
		if r.Source != client.IPv4 {
			t.Errorf("%s saw the pod's request come from %s, want the pod's own %s", name, r.Source, client.IPv4)
		}
	}
	for _, n := range c.Nodes {
		reaches(t, "node "+n.Name+" to ClusterIP", askTCP(n.NS, vip), backends...)
	}
}
