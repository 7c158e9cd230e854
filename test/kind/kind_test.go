// Package kind_test runs nftproxy's Service scenarios against a real kind
// cluster without kube-proxy: `make test-kind` (test/kind/run.sh) creates
// the cluster, deploys nftproxy and runs these tests with
// NFTPROXY_KIND_KUBECONFIG set. Without it they skip.
//
// Traffic comes from agnhost netexec pods (the image of upstream's network
// e2e tests): the test asks a pod, through the API server's pod proxy, to
// dial a frontend and report what answered (/dial), so the test machine
// needs no route into the cluster. Each test has its own namespace.
package kind_test

import (
	"slices"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

// TestAgentsReady: kube-proxy does not run, and one nftproxy agent runs
// Ready on every node.
func TestAgentsReady(t *testing.T) {
	c := use(t)
	t.Parallel()
	_, err := c.cs.AppsV1().DaemonSets("kube-system").Get(t.Context(), "kube-proxy", metav1.GetOptions{})
	if !apierrors.IsNotFound(err) {
		t.Errorf("kube-system/kube-proxy: got error %v, want NotFound: nftproxy must be the only service proxy", err)
	}

	var ds *appsv1.DaemonSet
	deadline := time.Now().Add(pollTimeout)
	for {
		ds, err = c.cs.AppsV1().DaemonSets(agentNamespace).Get(t.Context(), "nftproxy", metav1.GetOptions{})
		n := int32(len(c.nodes))
		if err == nil && ds.Status.ObservedGeneration == ds.Generation && ds.Status.DesiredNumberScheduled == n &&
			ds.Status.UpdatedNumberScheduled == n && ds.Status.NumberReady == n {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("DaemonSet %s/nftproxy not ready on all %d nodes after %v: status %+v, error %v", agentNamespace, n, pollTimeout, dsStatus(ds), err)
		}
		time.Sleep(pollEvery)
	}

	pods, err := c.cs.CoreV1().Pods(agentNamespace).List(t.Context(), metav1.ListOptions{LabelSelector: "app.kubernetes.io/name=nftproxy"})
	if err != nil {
		t.Fatalf("listing agent pods: %v", err)
	}
	ready := map[string]bool{}
	for i := range pods.Items {
		p := &pods.Items[i]
		if podReady(p) && p.DeletionTimestamp == nil {
			ready[p.Spec.NodeName] = true
		}
	}
	for _, n := range c.nodes {
		if !ready[n.Name] {
			t.Errorf("no Ready nftproxy pod on node %s", n.Name)
		}
	}
}

func dsStatus(ds *appsv1.DaemonSet) any {
	if ds == nil {
		return nil
	}
	return ds.Status
}

// TestProxyConfigStatus: the sample ProxyConfig is Accepted, not
// Degraded, and every node's agent reports running its generation.
func TestProxyConfigStatus(t *testing.T) {
	c := use(t)
	t.Parallel()
	n := int32(len(c.nodes))
	var pc proxyv1alpha1.ProxyConfig
	var err error
	deadline := time.Now().Add(pollTimeout) // the elected agent summarizes every 30 s
	for {
		err = c.ctrl.Get(t.Context(), client.ObjectKey{Name: "default"}, &pc)
		if err == nil {
			accepted := meta.FindStatusCondition(pc.Status.Conditions, proxyv1alpha1.ConditionAccepted)
			degraded := meta.FindStatusCondition(pc.Status.Conditions, proxyv1alpha1.ConditionDegraded)
			if accepted != nil && accepted.Status == metav1.ConditionTrue && accepted.ObservedGeneration == pc.Generation &&
				(degraded == nil || degraded.Status != metav1.ConditionTrue) &&
				pc.Status.Nodes == (proxyv1alpha1.NodeSummary{Total: n, Current: n}) {
				t.Logf("ProxyConfig default: generation %d, nodes %+v, conditions %+v", pc.Generation, pc.Status.Nodes, pc.Status.Conditions)
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("ProxyConfig default after %v: generation %d, status %+v (error %v); want Accepted=True for the generation, not Degraded, nodes {total: %d, current: %d, degraded: 0}",
				pollTimeout, pc.Generation, pc.Status, err, n, n)
		}
		time.Sleep(pollEvery)
	}
}

// backendsEverywhere starts one backend pod on every node (the control
// plane included) and a client pod on the first worker.
func backendsEverywhere(t *testing.T, c *cluster, ns string) (backends []*corev1.Pod, cl prober) {
	t.Helper()
	var specs []podOn
	for i, n := range c.nodes {
		specs = append(specs, podOn{name: "backend-" + string(rune('a'+i)), node: n, labels: map[string]string{"app": "backend"}})
	}
	specs = append(specs, podOn{name: "client", node: c.workers[0]})
	pods := c.startPods(t, ns, specs...)
	return pods[:len(c.nodes)], c.prober(pods[len(c.nodes)])
}

// TestClusterIP: from a pod, each ClusterIP (one per family) spreads new
// TCP connections and UDP flows over every endpoint, on every node, and
// the backend sees the pod's own address.
func TestClusterIP(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	backends, cl := backendsEverywhere(t, c, ns)
	svc := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "backend"},
			Ports:    []corev1.ServicePort{tcpPort(80), udpServicePort(90)},
		},
	}, len(backends))

	for _, to := range clusterIPs(svc, "http", 80) {
		cl.reachesAll(t, to, backends...)
		answers, err := cl.dial(t.Context(), to, "clientip", 5)
		if err != nil || !clean(answers, 5) {
			t.Fatalf("from %s to %s /clientip: %+v, %v", cl, to, answers, err)
		}
		want := podIP(cl.pod, familyOf(to.host))
		for _, a := range answers.Responses {
			if got := sourceHost(t, a); got != want {
				t.Errorf("from %s to %s: the backend saw source %s, want the pod's own %s (no masquerade)", cl, to, got, want)
			}
		}
	}
	for _, to := range clusterIPs(svc, "udp", 90) {
		cl.reachesAll(t, to, backends...)
	}
}

// TestNodePort: from a pod, every node's InternalIP of each of the
// Service's families spreads the NodePort's TCP connections and UDP flows
// over every endpoint (externalTrafficPolicy Cluster).
func TestNodePort(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	backends, cl := backendsEverywhere(t, c, ns)
	svc := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeNodePort,
			Selector: map[string]string{"app": "backend"},
			Ports:    []corev1.ServicePort{tcpPort(80), udpServicePort(90)},
		},
	}, len(backends))
	httpNodePort, udpNodePort := nodePort(t, svc, "http"), nodePort(t, svc, "udp")

	for _, n := range c.nodes {
		for _, f := range svc.Spec.IPFamilies {
			ip := nodeIP(n, f)
			if ip == "" {
				t.Errorf("node %s has no %s InternalIP", n.Name, f)
				continue
			}
			cl.reachesAll(t, frontend{"http", ip, httpNodePort}, backends...)
			cl.reachesAll(t, frontend{"udp", ip, udpNodePort}, backends...)
		}
	}
}

// TestHairpin: a pod reaches itself through its own Service (which needs
// the hairpin masquerade: without it the pod would answer itself
// directly and the connection would not complete).
func TestHairpin(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	pods := c.startPods(t, ns, podOn{name: "hairpin", node: c.workers[0], labels: map[string]string{"app": "hairpin"}})
	svc := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "hairpin"},
		Spec: corev1.ServiceSpec{
			Selector: map[string]string{"app": "hairpin"},
			Ports:    []corev1.ServicePort{tcpPort(80), udpServicePort(90)},
		},
	}, 1)
	self := c.prober(pods[0])
	for _, to := range append(clusterIPs(svc, "http", 80), clusterIPs(svc, "udp", 90)...) {
		self.reachesOnly(t, to, 5, pods[0])
	}
}

// TestSessionAffinityClientIP: with sessionAffinity ClientIP every new
// connection and flow of a client reaches the same endpoint; turned off
// on the running Service, they spread again.
func TestSessionAffinityClientIP(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	backends, cl := backendsEverywhere(t, c, ns)
	svc := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "sticky"},
		Spec: corev1.ServiceSpec{
			Selector:        map[string]string{"app": "backend"},
			Ports:           []corev1.ServicePort{tcpPort(80), udpServicePort(90)},
			SessionAffinity: corev1.ServiceAffinityClientIP,
		},
	}, len(backends))

	frontends := append(clusterIPs(svc, "http", 80), clusterIPs(svc, "udp", 90)...)
	for _, to := range frontends {
		first := cl.reachesOnly(t, to, 20, backends...)
		if got := hostnames(first.Responses); len(got) != 1 {
			t.Errorf("from %s to %s with ClientIP affinity: answers from %v, want one endpoint", cl, to, got)
			continue
		}
		again := cl.reachesOnly(t, to, 20, backends...)
		if got := hostnames(again.Responses); len(got) != 1 || got[0] != first.Responses[0] {
			t.Errorf("from %s to %s with ClientIP affinity: answers from %v after %s, want %s still", cl, to, got, first.Responses[0], first.Responses[0])
		}
		t.Logf("from %s to %s: stuck to %s", cl, to, first.Responses[0])
	}

	c.patchService(t, svc, `{"spec":{"sessionAffinity":"None","sessionAffinityConfig":null}}`)
	for _, to := range frontends {
		cl.reachesAll(t, to, backends...)
	}
}

// TestNoEndpointsRejects: a Service without endpoints refuses new
// connections and UDP flows at once, on its ClusterIPs and NodePorts,
// rather than letting them time out.
func TestNoEndpointsRejects(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	pods := c.startPods(t, ns, podOn{name: "client", node: c.workers[0]})
	cl := c.prober(pods[0])
	svc := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "empty"},
		Spec: corev1.ServiceSpec{
			Type:     corev1.ServiceTypeNodePort,
			Selector: map[string]string{"app": "nothing-has-this-label"},
			Ports:    []corev1.ServicePort{tcpPort(80), udpServicePort(90)},
		},
	}, 0)
	for _, to := range append(clusterIPs(svc, "http", 80), clusterIPs(svc, "udp", 90)...) {
		cl.refused(t, to)
	}
	for _, n := range c.nodes {
		for _, f := range svc.Spec.IPFamilies {
			if ip := nodeIP(n, f); ip != "" {
				cl.refused(t, frontend{"http", ip, nodePort(t, svc, "http")})
			}
		}
	}
}

// TestExternalTrafficPolicyLocal: under externalTrafficPolicy Local, a
// NodePort reached from outside the cluster's pods (a host-network pod on
// another node: its source is a node address, outside clusterCIDRs) goes
// only to the node's own endpoints with the client's address kept, and is
// dropped on a node without any; pods and the node itself still reach
// every endpoint. The Service starts under Cluster, to see the node
// without endpoints serve it before the switch.
//
// Nodes: the backend on the first worker, the clients on the second, the
// control plane has no endpoint.
func TestExternalTrafficPolicyLocal(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	withBackend, clientNode, without := c.workers[0], c.workers[1], c.controlPlane
	pods := c.startPods(t, ns,
		podOn{name: "backend", node: withBackend, labels: map[string]string{"app": "backend"}},
		podOn{name: "host-client", node: clientNode, hostNetwork: true},
		podOn{name: "pod-client", node: clientNode},
	)
	backend, hostClient, podClient := pods[0], c.prober(pods[1]), c.prober(pods[2])
	svc := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "local"},
		Spec: corev1.ServiceSpec{
			Type:                  corev1.ServiceTypeNodePort,
			Selector:              map[string]string{"app": "backend"},
			Ports:                 []corev1.ServicePort{tcpPort(80)},
			ExternalTrafficPolicy: corev1.ServiceExternalTrafficPolicyCluster,
		},
	}, 1)
	np := nodePort(t, svc, "http")
	at := func(n corev1.Node, f corev1.IPFamily) frontend { return frontend{"http", nodeIP(n, f), np} }
	var families []corev1.IPFamily
	for _, f := range svc.Spec.IPFamilies {
		if nodeIP(withBackend, f) != "" && nodeIP(clientNode, f) != "" && nodeIP(without, f) != "" {
			families = append(families, f)
		}
	}
	if len(families) == 0 {
		t.Fatalf("the nodes have no InternalIPs of the Service's families %v", svc.Spec.IPFamilies)
	}

	for _, f := range families {
		hostClient.reachesOnly(t, at(without, f), 5, backend)
	}
	c.patchService(t, svc, `{"spec":{"externalTrafficPolicy":"Local"}}`)
	for _, f := range families {
		hostClient.dropped(t, at(without, f))
		hostClient.reachesOnly(t, at(withBackend, f), 5, backend)
		answers, err := hostClient.dial(t.Context(), at(withBackend, f), "clientip", 5)
		if err != nil || !clean(answers, 5) {
			t.Fatalf("from %s to %s /clientip: %+v, %v", hostClient, at(withBackend, f), answers, err)
		}
		for _, a := range answers.Responses {
			if got := sourceHost(t, a); !slices.Contains(internalIPs(clientNode), got) {
				t.Errorf("from %s to %s: the backend saw source %s, want the client node's address %v (no masquerade under Local)",
					hostClient, at(withBackend, f), got, internalIPs(clientNode))
			}
		}
		podClient.reachesOnly(t, at(without, f), 5, backend)
		hostClient.reachesOnly(t, at(clientNode, f), 5, backend)
	}
}

func internalIPs(n corev1.Node) []string {
	var out []string
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP {
			out = append(out, a.Address)
		}
	}
	return out
}

// TestInternalTrafficPolicyLocal: under internalTrafficPolicy Local a pod
// reaches only the endpoints on its own node; a node without any drops
// the traffic. The second Service starts under Cluster, to see the node
// without endpoints serve it before the switch.
func TestInternalTrafficPolicyLocal(t *testing.T) {
	c := use(t)
	t.Parallel()
	ns := c.namespace(t)
	w0, w1 := c.workers[0], c.workers[1]
	pods := c.startPods(t, ns,
		podOn{name: "backend-0", node: w0, labels: map[string]string{"app": "backend", "first": "yes"}},
		podOn{name: "backend-1", node: w1, labels: map[string]string{"app": "backend"}},
		podOn{name: "client-0", node: w0},
		podOn{name: "client-1", node: w1},
	)
	b0, b1, c0, c1 := pods[0], pods[1], c.prober(pods[2]), c.prober(pods[3])
	local := corev1.ServiceInternalTrafficPolicyLocal
	cluster := corev1.ServiceInternalTrafficPolicyCluster
	both := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "both"},
		Spec: corev1.ServiceSpec{
			Selector:              map[string]string{"app": "backend"},
			Ports:                 []corev1.ServicePort{tcpPort(80)},
			InternalTrafficPolicy: &local,
		},
	}, 2)
	one := c.service(t, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "one"},
		Spec: corev1.ServiceSpec{
			Selector:              map[string]string{"app": "backend", "first": "yes"},
			Ports:                 []corev1.ServicePort{tcpPort(80)},
			InternalTrafficPolicy: &cluster,
		},
	}, 1)

	for _, to := range clusterIPs(both, "http", 80) {
		c0.reachesOnly(t, to, 20, b0)
		c1.reachesOnly(t, to, 20, b1)
	}
	for _, to := range clusterIPs(one, "http", 80) {
		c1.reachesOnly(t, to, 5, b0)
	}
	c.patchService(t, one, `{"spec":{"internalTrafficPolicy":"Local"}}`)
	for _, to := range clusterIPs(one, "http", 80) {
		c1.dropped(t, to)
		c0.reachesOnly(t, to, 5, b0)
	}
}
