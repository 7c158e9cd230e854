package kind_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
)

const (
	// kubeconfigEnv names the kind cluster's kubeconfig; test/kind/run.sh
	// sets it. Without it every cluster test skips.
	kubeconfigEnv = "NFTPROXY_KIND_KUBECONFIG"
	// agnhostEnv overrides the test image (a mirror, a newer release).
	agnhostEnv     = "NFTPROXY_KIND_AGNHOST_IMAGE"
	defaultAgnhost = "registry.k8s.io/e2e-test-images/agnhost:2.53"
	// keepEnv keeps the namespaces of failed tests, to look at them.
	keepEnv = "NFTPROXY_KIND_KEEP_NAMESPACES"

	agentNamespace = "nftproxy-system"

	// netexec's ports in pods, and in host-network pods (away from the
	// node's own daemons; UDP off there).
	httpPort     = 8080
	udpPort      = 8081
	hostHTTPPort = 18080

	// Polling bounds: generous, for a loaded machine pulling images; a
	// passing run takes seconds per wait.
	podTimeout  = 5 * time.Minute
	pollTimeout = 3 * time.Minute
	pollEvery   = 2 * time.Second
)

// cluster is the kind cluster under test.
type cluster struct {
	cs           kubernetes.Interface
	ctrl         client.Client
	nodes        []corev1.Node // every node, by name
	controlPlane corev1.Node
	workers      []corev1.Node
	image        string
}

var (
	connectOnce sync.Once
	theCluster  *cluster
	connectErr  error
)

// use returns the cluster, or skips the test when none is configured.
func use(t *testing.T) *cluster {
	t.Helper()
	path := os.Getenv(kubeconfigEnv)
	if path == "" {
		t.Skipf("skipping kind tests: %s is not set (make test-kind creates a kind cluster and sets it)", kubeconfigEnv)
	}
	connectOnce.Do(func() { theCluster, connectErr = connect(path) })
	if connectErr != nil {
		t.Fatal(connectErr)
	}
	return theCluster
}

func connect(kubeconfig string) (*cluster, error) {
	cfg, err := clientcmd.BuildConfigFromFlags("", kubeconfig)
	if err != nil {
		return nil, fmt.Errorf("reading %s=%s: %w", kubeconfigEnv, kubeconfig, err)
	}
	// Tests run in parallel and poll; client-go's default of 5 QPS would
	// make them wait on the client, not on the cluster.
	cfg.QPS, cfg.Burst = 50, 100
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, err
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := proxyv1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	ctrl, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, err
	}
	c := &cluster{cs: cs, ctrl: ctrl, image: defaultAgnhost}
	if img := os.Getenv(agnhostEnv); img != "" {
		c.image = img
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	nodes, err := cs.CoreV1().Nodes().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("listing nodes: %w", err)
	}
	c.nodes = nodes.Items
	sort.Slice(c.nodes, func(i, j int) bool { return c.nodes[i].Name < c.nodes[j].Name })
	controlPlanes := 0
	for _, n := range c.nodes {
		if _, ok := n.Labels["node-role.kubernetes.io/control-plane"]; ok {
			c.controlPlane = n
			controlPlanes++
		} else {
			c.workers = append(c.workers, n)
		}
	}
	if controlPlanes != 1 || len(c.workers) < 2 {
		return nil, fmt.Errorf("the cluster has %d control-plane nodes and %d workers, want 1 and at least 2 (test/kind/kind-config.yaml)",
			controlPlanes, len(c.workers))
	}
	return c, nil
}

// namespace creates a namespace for one test and deletes it after.
func (c *cluster) namespace(t *testing.T) string {
	t.Helper()
	ns, err := c.cs.CoreV1().Namespaces().Create(t.Context(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{
		GenerateName: "nftproxy-kind-",
		// Host-network clients need the privileged level.
		Labels: map[string]string{"pod-security.kubernetes.io/enforce": "privileged"},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating namespace: %v", err)
	}
	t.Logf("namespace %s", ns.Name)
	t.Cleanup(func() {
		if t.Failed() && os.Getenv(keepEnv) != "" {
			t.Logf("keeping namespace %s (%s is set)", ns.Name, keepEnv)
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		defer cancel()
		if err := c.cs.CoreV1().Namespaces().Delete(ctx, ns.Name, metav1.DeleteOptions{}); err != nil {
			t.Logf("deleting namespace %s: %v", ns.Name, err)
		}
	})
	return ns.Name
}

// podOn describes an agnhost netexec pod pinned to node.
type podOn struct {
	name        string
	node        corev1.Node
	labels      map[string]string
	hostNetwork bool
}

// startPods creates the pods and waits until all are Ready.
func (c *cluster) startPods(t *testing.T, ns string, specs ...podOn) []*corev1.Pod {
	t.Helper()
	for _, s := range specs {
		if _, err := c.cs.CoreV1().Pods(ns).Create(t.Context(), c.netexecPod(s), metav1.CreateOptions{}); err != nil {
			t.Fatalf("creating pod %s: %v", s.name, err)
		}
	}
	pods := make([]*corev1.Pod, len(specs))
	for i, s := range specs {
		pods[i] = c.waitReady(t, ns, s.name)
	}
	return pods
}

func (c *cluster) netexecPod(s podOn) *corev1.Pod {
	port := int32(httpPort)
	args := []string{"netexec", "--http-port=" + strconv.Itoa(httpPort), "--udp-port=" + strconv.Itoa(udpPort)}
	ports := []corev1.ContainerPort{
		{Name: "http", ContainerPort: httpPort, Protocol: corev1.ProtocolTCP},
		{Name: "udp", ContainerPort: udpPort, Protocol: corev1.ProtocolUDP},
	}
	if s.hostNetwork {
		port = hostHTTPPort
		args = []string{"netexec", "--http-port=" + strconv.Itoa(hostHTTPPort), "--udp-port=-1"}
		ports = []corev1.ContainerPort{{Name: "http", ContainerPort: hostHTTPPort, Protocol: corev1.ProtocolTCP}}
	}
	grace := int64(1)
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: s.name, Labels: s.labels},
		Spec: corev1.PodSpec{
			NodeSelector:                  map[string]string{"kubernetes.io/hostname": s.node.Labels["kubernetes.io/hostname"]},
			Tolerations:                   []corev1.Toleration{{Operator: corev1.TolerationOpExists}},
			HostNetwork:                   s.hostNetwork,
			TerminationGracePeriodSeconds: &grace,
			Containers: []corev1.Container{{
				Name:  "netexec",
				Image: c.image,
				Args:  args,
				Ports: ports,
				// /hostname: netexec's /healthz waits for its UDP server,
				// which host-network clients do not run.
				ReadinessProbe: &corev1.Probe{
					ProbeHandler:  corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/hostname", Port: intstr.FromInt32(port)}},
					PeriodSeconds: 2,
				},
			}},
		},
	}
}

func (c *cluster) waitReady(t *testing.T, ns, name string) *corev1.Pod {
	t.Helper()
	var pod *corev1.Pod
	var err error
	deadline := time.Now().Add(podTimeout)
	for {
		pod, err = c.cs.CoreV1().Pods(ns).Get(t.Context(), name, metav1.GetOptions{})
		if err == nil && podReady(pod) && pod.Status.PodIP != "" {
			return pod
		}
		if time.Now().After(deadline) {
			if err != nil {
				t.Fatalf("pod %s/%s: %v", ns, name, err)
			}
			t.Fatalf("pod %s/%s on %s is not Ready after %v: phase %s, conditions %+v, containers %+v",
				ns, name, pod.Spec.NodeName, podTimeout, pod.Status.Phase, pod.Status.Conditions, pod.Status.ContainerStatuses)
		}
		time.Sleep(pollEvery)
	}
}

func podReady(pod *corev1.Pod) bool {
	for _, cond := range pod.Status.Conditions {
		if cond.Type == corev1.PodReady {
			return cond.Status == corev1.ConditionTrue
		}
	}
	return false
}

// service creates svc (dual-stack where the cluster is) and waits until
// its EndpointSlices list that many ready endpoints in every family.
func (c *cluster) service(t *testing.T, ns string, svc *corev1.Service, endpoints int) *corev1.Service {
	t.Helper()
	if svc.Spec.IPFamilyPolicy == nil {
		policy := corev1.IPFamilyPolicyPreferDualStack
		svc.Spec.IPFamilyPolicy = &policy
	}
	created, err := c.cs.CoreV1().Services(ns).Create(t.Context(), svc, metav1.CreateOptions{})
	if err != nil {
		t.Fatalf("creating Service %s: %v", svc.Name, err)
	}
	if endpoints > 0 {
		c.waitEndpoints(t, created, endpoints)
	}
	t.Logf("Service %s: clusterIPs %v, ports %+v", created.Name, created.Spec.ClusterIPs, created.Spec.Ports)
	return created
}

func (c *cluster) waitEndpoints(t *testing.T, svc *corev1.Service, want int) {
	t.Helper()
	deadline := time.Now().Add(pollTimeout)
	for {
		ready := map[discoveryv1.AddressType]int{}
		list, err := c.cs.DiscoveryV1().EndpointSlices(svc.Namespace).List(t.Context(),
			metav1.ListOptions{LabelSelector: discoveryv1.LabelServiceName + "=" + svc.Name})
		if err == nil {
			for _, s := range list.Items {
				for _, ep := range s.Endpoints {
					if ep.Conditions.Ready != nil && *ep.Conditions.Ready {
						ready[s.AddressType]++
					}
				}
			}
		}
		done := err == nil
		for _, f := range svc.Spec.IPFamilies {
			done = done && ready[discoveryv1.AddressType(f)] == want
		}
		if done {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("Service %s/%s: ready endpoints per family %v after %v, want %d in each of %v (error %v)",
				svc.Namespace, svc.Name, ready, pollTimeout, want, svc.Spec.IPFamilies, err)
		}
		time.Sleep(pollEvery)
	}
}

// patchService applies a JSON merge patch to the Service.
func (c *cluster) patchService(t *testing.T, svc *corev1.Service, patch string) {
	t.Helper()
	if _, err := c.cs.CoreV1().Services(svc.Namespace).Patch(t.Context(), svc.Name, types.MergePatchType, []byte(patch), metav1.PatchOptions{}); err != nil {
		t.Fatalf("patching Service %s with %s: %v", svc.Name, patch, err)
	}
	t.Logf("Service %s: patched %s", svc.Name, patch)
}

func tcpPort(port int32) corev1.ServicePort {
	return corev1.ServicePort{Name: "http", Protocol: corev1.ProtocolTCP, Port: port, TargetPort: intstr.FromInt32(httpPort)}
}

func udpServicePort(port int32) corev1.ServicePort {
	return corev1.ServicePort{Name: "udp", Protocol: corev1.ProtocolUDP, Port: port, TargetPort: intstr.FromInt32(udpPort)}
}

// nodeIP is the node's InternalIP of the family, "" if it has none.
func nodeIP(n corev1.Node, f corev1.IPFamily) string {
	for _, a := range n.Status.Addresses {
		if a.Type == corev1.NodeInternalIP && familyOf(a.Address) == f {
			return a.Address
		}
	}
	return ""
}

// podIP is the pod's IP of the family, "" if it has none.
func podIP(p *corev1.Pod, f corev1.IPFamily) string {
	for _, ip := range p.Status.PodIPs {
		if familyOf(ip.IP) == f {
			return ip.IP
		}
	}
	return ""
}

func familyOf(ip string) corev1.IPFamily {
	a, err := netip.ParseAddr(ip)
	switch {
	case err != nil:
		return ""
	case a.Is4() || a.Is4In6():
		return corev1.IPv4Protocol
	default:
		return corev1.IPv6Protocol
	}
}

// frontend is where a client sends: protocol ("http" or "udp", as netexec
// names them), address and port.
type frontend struct {
	protocol string
	host     string
	port     int32
}

func (f frontend) String() string {
	return f.protocol + "://" + net.JoinHostPort(f.host, strconv.Itoa(int(f.port)))
}

// clusterIPs are the Service's ClusterIP frontends of the port, one per family.
func clusterIPs(svc *corev1.Service, protocol string, port int32) []frontend {
	var out []frontend
	for _, ip := range svc.Spec.ClusterIPs {
		out = append(out, frontend{protocol, ip, port})
	}
	return out
}

// nodePort is the NodePort of the Service's port named name.
func nodePort(t *testing.T, svc *corev1.Service, name string) int32 {
	t.Helper()
	for _, p := range svc.Spec.Ports {
		if p.Name == name && p.NodePort != 0 {
			return p.NodePort
		}
	}
	t.Fatalf("Service %s has no NodePort for port %q", svc.Name, name)
	return 0
}

// dialResult is netexec's /dial answer.
type dialResult struct {
	Responses []string `json:"responses"`
	Errors    []string `json:"errors"`
}

// prober is a netexec pod that dials on the test's behalf: the test asks
// it through the API server's pod proxy, as upstream's network e2e tests
// do, so no route from the test machine into the cluster is needed.
type prober struct {
	c    *cluster
	pod  *corev1.Pod
	port int // netexec's HTTP port in the pod
}

func (c *cluster) prober(pod *corev1.Pod) prober {
	port := httpPort
	if pod.Spec.HostNetwork {
		port = hostHTTPPort
	}
	return prober{c: c, pod: pod, port: port}
}

func (cl prober) String() string {
	kind := "pod"
	if cl.pod.Spec.HostNetwork {
		kind = "host-network pod"
	}
	return fmt.Sprintf("%s %s on %s", kind, cl.pod.Name, cl.pod.Spec.NodeName)
}

// dial has the pod send request to the frontend tries times, each on a
// new connection (UDP: a new socket), and returns what came back.
func (cl prober) dial(ctx context.Context, to frontend, request string, tries int) (dialResult, error) {
	// netexec gives each try 5 s.
	ctx, cancel := context.WithTimeout(ctx, time.Duration(tries)*6*time.Second+30*time.Second)
	defer cancel()
	raw, err := cl.c.cs.CoreV1().RESTClient().Get().
		Namespace(cl.pod.Namespace).Resource("pods").Name(fmt.Sprintf("%s:%d", cl.pod.Name, cl.port)).
		SubResource("proxy").Suffix("dial").
		Param("request", request).Param("protocol", to.protocol).
		Param("host", to.host).Param("port", strconv.Itoa(int(to.port))).
		Param("tries", strconv.Itoa(tries)).
		Do(ctx).Raw()
	var r dialResult
	if jerr := json.Unmarshal(raw, &r); jerr != nil {
		if err != nil {
			return r, fmt.Errorf("dial through the pod proxy: %w", err)
		}
		return r, fmt.Errorf("dial answer %q: %w", raw, jerr)
	}
	return r, nil
}

// until dials until ok accepts a round, and returns that round. Rounds
// that ok refuses are expected while the agents catch up with a change.
func (cl prober) until(t *testing.T, what string, to frontend, request string, tries int, ok func(dialResult) bool) dialResult {
	t.Helper()
	deadline := time.Now().Add(pollTimeout)
	for {
		r, err := cl.dial(t.Context(), to, request, tries)
		if err == nil && ok(r) {
			return r
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: from %s to %s (%s, %d tries): not so after %v; last round: responses %q, errors %q, error %v",
				what, cl, to, request, tries, pollTimeout, r.Responses, r.Errors, err)
		}
		time.Sleep(pollEvery)
	}
}

// reachesAll waits for a round in which every try answered and every
// backend answered at least once, and fails on answers from others: the
// frontend spreads new connections over all the backends.
func (cl prober) reachesAll(t *testing.T, to frontend, backends ...*corev1.Pod) {
	t.Helper()
	tries := 10 * len(backends)
	r := cl.until(t, "reaching every backend", to, "hostname", tries, func(r dialResult) bool {
		return clean(r, tries) && len(hostnames(r.Responses)) >= len(backends)
	})
	if !onlyFrom(r.Responses, backends...) {
		t.Errorf("from %s to %s: answers from %v, want only %v", cl, to, hostnames(r.Responses), names(backends))
	}
	t.Logf("from %s to %s: answers from %v", cl, to, hostnames(r.Responses))
}

// reachesOnly waits for a round in which every try answered, then fails
// unless all the answers came from want.
func (cl prober) reachesOnly(t *testing.T, to frontend, tries int, want ...*corev1.Pod) dialResult {
	t.Helper()
	r := cl.until(t, "reaching "+strings.Join(names(want), ", "), to, "hostname", tries, func(r dialResult) bool { return clean(r, tries) })
	if !onlyFrom(r.Responses, want...) {
		t.Errorf("from %s to %s: answers from %v, want only %v", cl, to, hostnames(r.Responses), names(want))
	}
	return r
}

// dropped waits for a round in which no try got an answer.
func (cl prober) dropped(t *testing.T, to frontend) {
	t.Helper()
	const tries = 2
	r := cl.until(t, "no answer", to, "hostname", tries, func(r dialResult) bool {
		return len(r.Responses) == 0 && len(r.Errors) == tries
	})
	t.Logf("from %s to %s: no answer (%q)", cl, to, r.Errors)
}

// refused waits for a round in which every try was refused (TCP reset or
// ICMP port unreachable), not left to time out.
func (cl prober) refused(t *testing.T, to frontend) {
	t.Helper()
	const tries = 3
	r := cl.until(t, "connection refused", to, "hostname", tries, func(r dialResult) bool {
		if len(r.Responses) != 0 || len(r.Errors) != tries {
			return false
		}
		for _, e := range r.Errors {
			if !strings.Contains(e, "connection refused") {
				return false
			}
		}
		return true
	})
	t.Logf("from %s to %s: refused (%q)", cl, to, r.Errors[0])
}

func clean(r dialResult, tries int) bool {
	return len(r.Errors) == 0 && len(r.Responses) == tries
}

func onlyFrom(responses []string, pods ...*corev1.Pod) bool {
	want := names(pods)
	for _, r := range responses {
		if !slices.Contains(want, r) {
			return false
		}
	}
	return true
}

// hostnames are the distinct answers, sorted.
func hostnames(responses []string) []string {
	out := slices.Clone(responses)
	slices.Sort(out)
	return slices.Compact(out)
}

func names(pods []*corev1.Pod) []string {
	out := make([]string, len(pods))
	for i, p := range pods {
		out[i] = p.Name
	}
	return out
}

// sourceHost is the address part of netexec's /clientip answer.
func sourceHost(t *testing.T, answer string) string {
	t.Helper()
	host, _, err := net.SplitHostPort(answer)
	if err != nil {
		t.Fatalf("clientip answer %q: %v", answer, err)
	}
	return host
}
