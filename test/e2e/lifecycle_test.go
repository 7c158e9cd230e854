package e2e

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os/exec"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	coordinationv1 "k8s.io/api/coordination/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

// The lifecycle scenarios: endpoints churning under traffic, UDP flows
// moved by conntrack cleanup, the ProxyConfig edited live, agents killed
// and restarted, the API server away for a while, and `nftproxy cleanup`.
// The ones that disrupt the shared cluster put it back in t.Cleanup, so it
// is as they found it even when they fail.

// TestEndpointChurnUnderTraffic: while a pod and a client outside the
// cluster open connection after connection (to the ClusterIP and to a
// NodePort, backends all on other nodes), a Service's three endpoints are
// replaced one by one several times as a rolling update does (the new pod
// added ready, the old one marked terminating, then removed). No
// connection fails: a ruleset write never leaves a moment without
// backends, and every answer comes from a pod that was an endpoint.
func TestEndpointChurnUnderTraffic(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	// Four pods on node0 and node1 take turns as the three endpoints; the
	// clients reach them from node2.
	pool := []*cluster.Pod{c.Nodes[0].Pods[0], c.Nodes[1].Pods[0], c.Nodes[0].Pods[1], c.Nodes[1].Pods[1]}
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "churn"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	vip := hostPort(svc.Spec.ClusterIP, 80)
	nodePort := hostPort(c.Nodes[2].IPv4, svc.Spec.Ports[0].NodePort)
	current := slices.Clone(pool[:3]) // oldest first
	setEndpoints(t, c, svc, cluster.ReadyPods(current...))

	client := c.Nodes[2].Pods[0]
	watch := askTCP(c.Nodes[2].NS, vip)
	reaches(t, "ClusterIP before the rollout", watch, current...)
	reaches(t, "NodePort before the rollout", askTCP(c.Client, nodePort), current...)

	fromPod := lcStartLoop(t, "pod to ClusterIP", askTCP(client.NS, vip))
	fromClient := lcStartLoop(t, "client to NodePort", askTCP(c.Client, nodePort))

	const steps = 4 // each pod of the pool replaced at least once
	for step := range steps {
		spare := pool[(step+3)%len(pool)]
		oldest := current[0]
		rest := current[1:]
		// The new pod is up and ready: four endpoints.
		setEndpoints(t, c, svc, cluster.ReadyPods(append(slices.Clone(rest), oldest, spare)...))
		reaches(t, fmt.Sprintf("step %d: %s added", step, spare.Name), watch, append(slices.Clone(rest), oldest, spare)...)
		// The old pod is deleted: terminating, still serving, but no new
		// connection goes to it while ready endpoints remain.
		eps := append(cluster.ReadyPods(append(slices.Clone(rest), spare)...), cluster.Endpoint{Pod: oldest, State: cluster.Terminating})
		setEndpoints(t, c, svc, eps)
		current = append(slices.Clone(rest), spare)
		lcSettled(t, fmt.Sprintf("step %d: %s terminating", step, oldest.Name), watch, current...)
		// And gone.
		setEndpoints(t, c, svc, cluster.ReadyPods(current...))
	}
	onlyReaches(t, "ClusterIP after the rollout", watch, 30, current...)

	allowed := podNames(pool)
	fromPod.check(t, allowed, 20)
	fromClient.check(t, allowed, 20)
}

// TestUDPBackendReplacedConntrackCleared: a DNS-like client keeps one UDP
// socket (one source port) to a Service. When the Service's only endpoint
// is replaced, the client's next queries on that socket reach the new
// endpoint: the agent deleted the conntrack entry that pinned the flow to
// the old pod (which still answers, so without the cleanup the client
// would stay on it). When the endpoints go, the socket's queries are
// rejected; when one comes back, the same socket is answered again.
func TestUDPBackendReplacedConntrackCleared(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	a, b := c.Nodes[0].Pods[0], c.Nodes[1].Pods[0]
	client := c.Nodes[2].Pods[0]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "dns"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{udpPort("dns", 53, intstr.FromString("dns"))}},
	})
	vip := hostPort(svc.Spec.ClusterIP, 53)
	setEndpoints(t, c, svc, cluster.ReadyPods(a))
	reaches(t, "UDP ClusterIP to A", askUDP(client.NS, vip), a)

	conn, err := client.DialUDP(vip, 500*time.Millisecond)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close() })
	source := conn.LocalAddr()
	r, err := conn.Ask()
	if err != nil {
		t.Fatalf("first query: %v", err)
	}
	if r.Server != a.Name || r.Source != client.IPv4 {
		t.Fatalf("first query answered by %s, want %s seeing %s", r, a.Name, client.IPv4)
	}
	// The flow is pinned: A keeps answering the socket, query after query.
	for range 5 {
		if r, err := conn.Ask(); err != nil || r.Server != a.Name {
			t.Fatalf("query before the change: %v, %v; want %s", r, err, a.Name)
		}
	}

	setEndpoints(t, c, svc, cluster.ReadyPods(b))
	var fromA int
	eventually(t, "the same socket answered by B", func() error {
		r, err := conn.Ask()
		switch {
		case err != nil:
			return err
		case r.Server == a.Name:
			fromA++
			return fmt.Errorf("still answered by %s (%d times since the change)", a.Name, fromA)
		case r.Server != b.Name:
			return fmt.Errorf("answered by %s, want %s", r.Server, b.Name)
		case r.Source != client.IPv4:
			return fmt.Errorf("%s saw %s, want the pod's own %s", b.Name, r.Source, client.IPv4)
		}
		return nil
	})
	t.Logf("moved to %s after %d more answers from %s", b.Name, fromA, a.Name)
	for range 5 {
		if r, err := conn.Ask(); err != nil || r.Server != b.Name {
			t.Fatalf("query after the move: %v, %v; want %s", r, err, b.Name)
		}
	}
	if got := conn.LocalAddr(); got != source {
		t.Fatalf("the socket's source moved from %s to %s", source, got)
	}
	if out := lcConntrackUDP(t, c.Nodes[2], svc.Spec.ClusterIP); strings.Contains(out, "src="+a.IPv4.String()+" ") {
		t.Errorf("node2 still has a conntrack entry to %s for the ClusterIP:\n%s", a.IPv4, out)
	}

	// No endpoint: the socket's queries are rejected (port unreachable),
	// not left unanswered.
	setEndpoints(t, c, svc, nil)
	eventually(t, "the same socket refused with no endpoint", func() error {
		r, err := conn.Ask()
		switch {
		case err == nil:
			return fmt.Errorf("answered by %s", r)
		case !errors.Is(err, syscall.ECONNREFUSED):
			return fmt.Errorf("not refused: %w", err)
		}
		return nil
	})
	// An endpoint again: the same socket is answered.
	setEndpoints(t, c, svc, cluster.ReadyPods(a))
	eventually(t, "the same socket answered once an endpoint is back", func() error {
		r, err := conn.Ask()
		switch {
		case err != nil:
			return err
		case r.Server != a.Name:
			return fmt.Errorf("answered by %s, want %s", r.Server, a.Name)
		}
		return nil
	})
	if got := conn.LocalAddr(); got != source {
		t.Fatalf("the socket's source moved from %s to %s", source, got)
	}
}

// TestMasqueradeAllLive: setting masqueradeAll on the live ProxyConfig
// makes the agents masquerade ClusterIP traffic from pods (a backend on
// another node sees the client node's address, on both families), and
// clearing it gives the pod's own address back; no restart involved.
func TestMasqueradeAllLive(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	backend, client := c.Nodes[0].Pods[0], c.Nodes[2].Pods[0]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "masq"},
		Spec: corev1.ServiceSpec{
			IPFamilyPolicy: ptr.To(corev1.IPFamilyPolicyRequireDualStack),
			Ports:          []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))},
		},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backend))
	vips := map[netip.Addr]string{ // pod address → the ClusterIP of its family
		client.IPv4: hostPort(clusterIP(t, svc, corev1.IPv4Protocol), 80),
		client.IPv6: hostPort(clusterIP(t, svc, corev1.IPv6Protocol), 80),
	}
	node := map[netip.Addr]netip.Addr{client.IPv4: client.Node.IPv4, client.IPv6: client.Node.IPv6}
	seenFrom := func(what string, want func(pod netip.Addr) netip.Addr) {
		t.Helper()
		for pod, vip := range vips {
			eventually(t, what, func() error {
				r, err := client.AskTCP(vip, answer)
				switch {
				case err != nil:
					return err
				case r.Server != backend.Name:
					return fmt.Errorf("answered by %s, want %s", r.Server, backend.Name)
				case r.Source != want(pod):
					return fmt.Errorf("%s saw the pod's request to %s come from %s, want %s", backend.Name, vip, r.Source, want(pod))
				}
				return nil
			})
		}
	}
	own := func(pod netip.Addr) netip.Addr { return pod }
	ofNode := func(pod netip.Addr) netip.Addr { return node[pod] }

	seenFrom("before: the pod's own address", own)
	restore := lcEditProxyConfig(t, c, func(s *proxyv1alpha1.ProxyConfigSpec) { s.MasqueradeAll = true })
	t.Cleanup(restore)
	seenFrom("masqueradeAll: the node's address", ofNode)
	// Every new connection now, not just some.
	for pod, vip := range vips {
		for range 10 {
			if r, err := client.AskTCP(vip, answer); err != nil || r.Source != node[pod] {
				t.Fatalf("masqueradeAll, to %s: %v, %v; want the source %s", vip, r, err, node[pod])
			}
		}
	}
	lcEditProxyConfig(t, c, func(s *proxyv1alpha1.ProxyConfigSpec) { s.MasqueradeAll = false })
	seenFrom("masqueradeAll off again: the pod's own address", own)
}

// TestAgentsKilledAndRestarted: every agent is SIGKILLed and started again.
// Established connections (a pod's to a ClusterIP backend on another node,
// a client's to a NodePort) keep working while the agents are away and
// after they are back, new connections never fail meanwhile (the rules
// stay in the kernel, and the new agent's first write replaces them
// without a gap), and a Service created afterwards is programmed on every
// node: the new agents took over.
func TestAgentsKilledAndRestarted(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	lcRestoreAgentsAtCleanup(t, c)
	backends := c.Nodes[0].Pods
	client := c.Nodes[2].Pods[0]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "before"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backends...))
	vip := hostPort(svc.Spec.ClusterIP, 80)
	nodePort := hostPort(c.Nodes[1].IPv4, svc.Spec.Ports[0].NodePort)
	reaches(t, "ClusterIP", askTCP(client.NS, vip), backends...)
	reaches(t, "NodePort", askTCP(c.Client, nodePort), backends...)

	held := lcHold(t, map[string]func() (*netnstest.Conn, netnstest.Reply, error){
		"pod to ClusterIP":   func() (*netnstest.Conn, netnstest.Reply, error) { return client.DialTCP(vip, answer) },
		"client to NodePort": func() (*netnstest.Conn, netnstest.Reply, error) { return c.Client.DialTCP(nodePort, answer) },
	})
	fromPod := lcStartLoop(t, "pod to ClusterIP", askTCP(client.NS, vip))
	fromClient := lcStartLoop(t, "client to NodePort", askTCP(c.Client, nodePort))

	for _, n := range c.Nodes {
		n.Agent.Kill()
	}
	time.Sleep(time.Second) // traffic with no agent at all
	held.check(t, "with the agents dead")
	for _, n := range c.Nodes {
		if err := n.StartAgent(); err != nil {
			t.Fatal(err)
		}
	}
	lcWaitReady(t, c)
	time.Sleep(500 * time.Millisecond) // and traffic after the takeover
	allowed := podNames(backends)
	fromPod.check(t, allowed, 20)
	fromClient.check(t, allowed, 20)
	held.check(t, "after the restart")

	after := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "after"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, after, cluster.ReadyPods(c.Nodes[1].Pods[0]))
	for _, n := range c.Nodes {
		reaches(t, "new Service's ClusterIP from "+n.Name, askTCP(n.NS, hostPort(after.Spec.ClusterIP, 80)), c.Nodes[1].Pods[0])
		reaches(t, "new Service's NodePort on "+n.Name, askTCP(c.Client, hostPort(n.IPv4, after.Spec.Ports[0].NodePort)), c.Nodes[1].Pods[0])
	}
	lcProbeAll(t, c)
}

// apiServerAway is how long TestAPIServerAway keeps the API server
// away, from the moment it is told to stop: longer than the leader
// election's renew deadline (10 s), so that the elected agent cannot renew
// its lease meanwhile, as in a real control-plane outage or upgrade.
const apiServerAway = 13 * time.Second

// TestAPIServerAway: with the API server stopped, traffic to existing
// Services keeps flowing without a failure, and every agent stays up,
// live (/healthz: nothing is pending, so the rules are not stale) and
// ready, the elected one too although it cannot renew its lease. Once the
// API server is back, a new Service and an endpoint change on the old one
// are programmed on every node: the agents' watches reconnected.
func TestAPIServerAway(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	lcRestoreAgentsAtCleanup(t, c)
	before, moved := c.Nodes[0].Pods[0], c.Nodes[1].Pods[1]
	client := c.Nodes[2].Pods[0]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "old"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(before))
	vip := hostPort(svc.Spec.ClusterIP, 80)
	nodePort := hostPort(c.Nodes[1].IPv4, svc.Spec.Ports[0].NodePort)
	reaches(t, "ClusterIP", askTCP(client.NS, vip), before)
	reaches(t, "NodePort", askTCP(c.Client, nodePort), before)
	pids := map[string]int{}
	for _, n := range c.Nodes {
		pids[n.Name] = n.Agent.Pid()
	}
	// Some agent is elected (after agents were killed, the lease of the
	// dead one has to expire first): the outage is to find it holding the
	// lease.
	lcWaitLeader(t, c)

	fromPod := lcStartLoop(t, "pod to ClusterIP", askTCP(client.NS, vip))
	fromClient := lcStartLoop(t, "client to NodePort", askTCP(c.Client, nodePort))
	stopped := false
	t.Cleanup(func() {
		if stopped {
			if err := c.StartAPIServer(); err != nil {
				t.Errorf("restarting the API server: %v", err)
			}
			lcWaitAPI(t, c)
		}
	})
	away := time.Now()
	stopped = true
	lcStopAPIServer(t, c)
	died := map[string]bool{}
	for {
		for _, n := range c.Nodes {
			if died[n.Name] {
				continue
			}
			if !n.Agent.Running() {
				died[n.Name] = true
				t.Errorf("%s: the agent exited %v after the API server went away; log:\n%s",
					n.Name, time.Since(away).Round(time.Second), lcLogLines(n.Agent, "leader", 10))
				continue
			}
			for _, path := range []string{"/healthz", "/readyz"} {
				if err := n.Agent.Probe(path); err != nil {
					t.Errorf("%s while the API server is away: %v", n.Name, err)
				}
			}
		}
		if time.Since(away) > apiServerAway {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	fromPod.check(t, []string{before.Name}, 20)
	fromClient.check(t, []string{before.Name}, 20)

	if err := c.StartAPIServer(); err != nil {
		t.Fatalf("restarting the API server: %v", err)
	}
	stopped = false
	back := time.Now()
	t.Logf("the API server was away for %v", back.Sub(away).Round(time.Millisecond))
	lcWaitAPI(t, c)
	// The agents' informers retry with client-go's backoff, which grows
	// to 30 s while the API server is away: catching up may take that
	// long after it returns.
	fresh := &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "new"},
		Spec: corev1.ServiceSpec{Type: corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	}
	if err := c.API.Create(context.Background(), fresh); err != nil {
		t.Fatal(err)
	}
	if err := c.WaitProgrammed(context.Background(), fresh, 2*time.Minute); err != nil {
		t.Fatal(err)
	}
	t.Logf("a Service created once it returned was programmed on every node %v after it returned", time.Since(back).Round(time.Millisecond))
	setEndpoints(t, c, svc, cluster.ReadyPods(moved))
	newBackend := c.Nodes[2].Pods[1]
	setEndpoints(t, c, fresh, cluster.ReadyPods(newBackend))
	for _, n := range c.Nodes {
		if died[n.Name] {
			continue // reported above; nothing programs that node now
		}
		reaches(t, "old Service's new endpoint from "+n.Name, askTCP(n.NS, vip), moved)
		reaches(t, "new Service from "+n.Name, askTCP(n.NS, hostPort(fresh.Spec.ClusterIP, 80)), newBackend)
		reaches(t, "new Service's NodePort on "+n.Name, askTCP(c.Client, hostPort(n.IPv4, fresh.Spec.Ports[0].NodePort)), newBackend)
		if n.Agent.Pid() != pids[n.Name] {
			t.Errorf("%s: the agent was restarted", n.Name)
		}
		for _, path := range []string{"/healthz", "/readyz"} {
			if err := n.Agent.Probe(path); err != nil {
				t.Errorf("%s after the API server came back: %v", n.Name, err)
			}
		}
	}
}

// lcWaitLeader waits until a live agent holds the leader election Lease:
// one that renews it (every 2 s), not one killed before its lease expired.
func lcWaitLeader(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	get := func() (holder string, renewed time.Time, err error) {
		var lease coordinationv1.Lease
		err = c.API.Get(context.Background(), client.ObjectKey{Namespace: "nftproxy-system", Name: "nftproxy-default"}, &lease)
		if lease.Spec.RenewTime != nil {
			renewed = lease.Spec.RenewTime.Time
		}
		return ptr.Deref(lease.Spec.HolderIdentity, ""), renewed, err
	}
	eventually(t, "an elected agent renewing its lease", func() error {
		holder, first, err := get()
		if err != nil {
			return err
		}
		time.Sleep(2500 * time.Millisecond)
		again, renewed, err := get()
		switch {
		case err != nil:
			return err
		case holder == "" || again != holder:
			return fmt.Errorf("the leader Lease is held by %q, then %q", holder, again)
		case !renewed.After(first):
			return fmt.Errorf("the leader Lease of %s was not renewed in 2.5s (last %v)", holder, renewed)
		}
		t.Logf("leader: %s, renewing", holder)
		return nil
	})
}

// lcLogLines is the last n lines of the agent's log that contain word.
func lcLogLines(a *cluster.Agent, word string, n int) string {
	var out []string
	for _, l := range strings.Split(a.LogTail(2000), "\n") {
		if strings.Contains(strings.ToLower(l), word) {
			out = append(out, l)
		}
	}
	if len(out) > n {
		out = out[len(out)-n:]
	}
	return strings.Join(out, "\n")
}

// TestCleanupLeavesOtherTables: `nftproxy cleanup` on a node whose agent
// has stopped deletes the nftproxy table (the node's ClusterIPs no longer
// work) and nothing else: another table with a chain and a rule is intact.
// A restarted agent programs the node again.
func TestCleanupLeavesOtherTables(t *testing.T) {
	c := use(t)
	ns := namespace(t, c)
	lcRestoreAgentsAtCleanup(t, c)
	node := c.Nodes[2]
	backend, client := c.Nodes[0].Pods[0], node.Pods[0]
	svc := createService(t, c, ns, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "echo"},
		Spec:       corev1.ServiceSpec{Ports: []corev1.ServicePort{tcpPort("tcp", 80, intstr.FromInt32(cluster.EchoPort))}},
	})
	setEndpoints(t, c, svc, cluster.ReadyPods(backend))
	vip := hostPort(svc.Spec.ClusterIP, 80)
	reaches(t, "ClusterIP from a pod of "+node.Name, askTCP(client.NS, vip), backend)

	const other = "lifecycle-cni"
	for _, cmd := range [][]string{
		{"nft", "add", "table", "inet", other},
		{"nft", "add", "chain", "inet", other, "forward", "{ type filter hook forward priority 10 ; policy accept ; }"},
		{"nft", "add", "rule", "inet", other, "forward", "ip", "saddr", "198.51.100.0/24", "counter", "accept"},
	} {
		if _, err := node.NS.Run(cmd...); err != nil {
			t.Fatal(err)
		}
	}
	t.Cleanup(func() { _, _ = node.NS.Run("nft", "delete", "table", "inet", other) })
	want, err := node.NS.Run("nft", "list", "table", "inet", other)
	if err != nil {
		t.Fatal(err)
	}

	start := time.Now()
	if err := node.Agent.Stop(); err != nil {
		t.Fatalf("stopping %s's agent: %v", node.Name, err)
	}
	t.Logf("%s's agent stopped in %v", node.Name, time.Since(start).Round(time.Millisecond))
	// A stopped agent leaves its rules: traffic still flows.
	onlyReaches(t, "ClusterIP with the agent stopped", askTCP(client.NS, vip), 5, backend)

	out, err := exec.Command(agentPath, "cleanup", "--netns", node.NS.Path()).CombinedOutput()
	if err != nil {
		t.Fatalf("nftproxy cleanup: %v\n%s", err, out)
	}
	t.Logf("nftproxy cleanup: %s", strings.TrimSpace(string(out)))
	if tables, err := node.NS.Run("nft", "list", "tables"); err != nil {
		t.Fatal(err)
	} else if strings.Contains(tables, "nftproxy") || !strings.Contains(tables, "table inet "+other) {
		t.Fatalf("tables after cleanup, want %s and no nftproxy:\n%s", other, tables)
	}
	if got, err := node.NS.Run("nft", "list", "table", "inet", other); err != nil || got != want {
		t.Fatalf("table %s after cleanup: %v\n%s\nwant:\n%s", other, err, got, want)
	}
	// Without the rules the ClusterIP is just an address routed to the
	// gateway, which drops it.
	dropped(t, "ClusterIP with the table gone", askTCP(client.NS, vip))

	start = time.Now()
	if err := node.StartAgent(); err != nil {
		t.Fatal(err)
	}
	if err := node.Agent.WaitReady(context.Background(), converge); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s's agent ready again in %v", node.Name, time.Since(start).Round(time.Millisecond))
	reaches(t, "ClusterIP from a pod of "+node.Name+" after the restart", askTCP(client.NS, vip), backend)
	if got, err := node.NS.Run("nft", "list", "table", "inet", other); err != nil || got != want {
		t.Fatalf("table %s after the agent restarted: %v\n%s\nwant:\n%s", other, err, got, want)
	}
}

// lcSettled waits until asking reaches every one of want and nothing
// else, in 40 requests in a row: reaches stops at the first round that
// saw every wanted pod, which, while a pod still to leave is drawn one time
// in four, passes too early one time in four.
func lcSettled(t *testing.T, what string, a ask, want ...*cluster.Pod) {
	t.Helper()
	eventually(t, what, func() error {
		seen, err := sample(a, 40, want)
		if err == nil && len(seen) < len(want) {
			err = fmt.Errorf("reached only %v of %v", keys(seen), podNames(want))
		}
		return err
	})
}

// lcLoop asks again and again on a goroutine, counting answers by server
// and failures, until stopped.
type lcLoop struct {
	name    string
	stop    chan struct{}
	done    chan struct{}
	once    sync.Once
	mu      sync.Mutex
	ok      int
	failed  int
	errs    []string
	servers map[string]int
	started time.Time
}

func lcStartLoop(t *testing.T, name string, a ask) *lcLoop {
	l := &lcLoop{name: name, stop: make(chan struct{}), done: make(chan struct{}), servers: map[string]int{}, started: time.Now()}
	go func() {
		defer close(l.done)
		for {
			select {
			case <-l.stop:
				return
			default:
			}
			r, err := a()
			l.mu.Lock()
			if err != nil {
				l.failed++
				if len(l.errs) < 5 {
					l.errs = append(l.errs, fmt.Sprintf("at +%v: %v", time.Since(l.started).Round(time.Millisecond), err))
				}
			} else {
				l.ok++
				l.servers[r.Server]++
			}
			l.mu.Unlock()
			time.Sleep(5 * time.Millisecond)
		}
	}()
	t.Cleanup(l.halt)
	return l
}

func (l *lcLoop) halt() {
	l.once.Do(func() { close(l.stop) })
	<-l.done
}

// check stops the loop and fails on any failure, on fewer than minOK
// answers, or on an answer from a server not in allowed.
func (l *lcLoop) check(t *testing.T, allowed []string, minOK int) {
	t.Helper()
	l.halt()
	t.Logf("%s: %d answered, %d failed in %v; by server %v", l.name, l.ok, l.failed, time.Since(l.started).Round(time.Millisecond), l.servers)
	if l.failed > 0 {
		t.Errorf("%s: %d of %d requests failed, first: %s", l.name, l.failed, l.ok+l.failed, strings.Join(l.errs, "; "))
	}
	if l.ok < minOK {
		t.Errorf("%s: only %d answers, want at least %d", l.name, l.ok, minOK)
	}
	for s := range l.servers {
		if !slices.Contains(allowed, s) {
			t.Errorf("%s: answered by %s, which was never an endpoint (%v)", l.name, s, allowed)
		}
	}
}

// lcHeld are open connections, each with the server that greeted it.
type lcHeld map[string]struct {
	conn  *netnstest.Conn
	first netnstest.Reply
}

// lcHold opens each connection, closed at cleanup.
func lcHold(t *testing.T, dials map[string]func() (*netnstest.Conn, netnstest.Reply, error)) lcHeld {
	t.Helper()
	held := lcHeld{}
	for name, dial := range dials {
		conn, r, err := dial()
		if err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		t.Cleanup(func() { _ = conn.Close() })
		held[name] = struct {
			conn  *netnstest.Conn
			first netnstest.Reply
		}{conn, r}
	}
	return held
}

// check asks on each held connection: it must still work, on the server
// (and with the source) that first answered it.
func (h lcHeld) check(t *testing.T, when string) {
	t.Helper()
	for name, c := range h {
		r, err := c.conn.Ask()
		if err != nil {
			t.Errorf("%s, established before, %s: %v", name, when, err)
			continue
		}
		if r != c.first {
			t.Errorf("%s, established before, %s: answered as %s, first as %s", name, when, r, c.first)
		}
	}
}

// lcRestoreAgentsAtCleanup makes sure, at the end of the test, that every
// node's agent runs and is ready again, whatever the test did to it.
func lcRestoreAgentsAtCleanup(t *testing.T, c *cluster.Cluster) {
	t.Cleanup(func() {
		for _, n := range c.Nodes {
			if !n.Agent.Running() {
				t.Logf("%s: restarting the agent the test left stopped", n.Name)
				if err := n.StartAgent(); err != nil {
					t.Errorf("%s: %v", n.Name, err)
				}
			}
		}
		lcWaitReady(t, c)
	})
}

func lcWaitReady(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	for _, n := range c.Nodes {
		if err := n.Agent.WaitReady(context.Background(), converge); err != nil {
			t.Error(err)
		}
	}
}

// lcProbeAll checks every agent's /healthz and /readyz.
func lcProbeAll(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	for _, n := range c.Nodes {
		for _, path := range []string{"/healthz", "/readyz"} {
			if err := n.Agent.Probe(path); err != nil {
				t.Errorf("%s: %v", n.Name, err)
			}
		}
	}
}

// lcStopAPIServer stops the API server and checks it is gone. envtest
// gives kube-apiserver 20 s to exit after SIGTERM, which it does not (it
// keeps the agents' watch streams open), and then kills it, reporting the
// timeout as an error: the outcome is the same, a stopped API server.
func lcStopAPIServer(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	start := time.Now()
	gone := make(chan time.Duration, 1)
	go func() {
		for time.Since(start) < time.Minute {
			_, err := c.Clientset.CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{Limit: 1})
			if err != nil && errors.Is(err, syscall.ECONNREFUSED) {
				gone <- time.Since(start)
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		gone <- -1
	}()
	err := c.StopAPIServer()
	t.Logf("StopAPIServer returned after %v (%v); refusing connections after %v", time.Since(start).Round(time.Millisecond), err, (<-gone).Round(time.Millisecond))
	if err != nil && !strings.Contains(err.Error(), "timeout waiting for process") {
		t.Fatalf("stopping the API server: %v", err)
	}
	if _, err := c.Clientset.CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{Limit: 1}); err == nil {
		t.Fatal("the API server still answers after StopAPIServer")
	}
}

// lcWaitAPI waits until the API server answers again.
func lcWaitAPI(t *testing.T, c *cluster.Cluster) {
	t.Helper()
	eventually(t, "the API server answers", func() error {
		_, err := c.Clientset.CoreV1().Namespaces().List(context.Background(), metav1.ListOptions{Limit: 1})
		return err
	})
}

// lcEditProxyConfig changes ProxyConfig default (get, modify, update,
// retrying on conflicts) and returns a func that puts the spec back as it
// was.
func lcEditProxyConfig(t *testing.T, c *cluster.Cluster, mutate func(*proxyv1alpha1.ProxyConfigSpec)) (restore func()) {
	t.Helper()
	var orig proxyv1alpha1.ProxyConfigSpec
	first := true
	write := func(mutate func(*proxyv1alpha1.ProxyConfigSpec)) error {
		ctx := context.Background()
		var err error
		for range 5 {
			var pc proxyv1alpha1.ProxyConfig
			if err = c.API.Get(ctx, client.ObjectKey{Name: "default"}, &pc); err != nil {
				return err
			}
			if first {
				orig, first = *pc.Spec.DeepCopy(), false
			}
			mutate(&pc.Spec)
			if err = c.API.Update(ctx, &pc); err == nil {
				return nil
			}
		}
		return err
	}
	if err := write(mutate); err != nil {
		t.Fatalf("updating ProxyConfig default: %v", err)
	}
	return func() {
		if err := write(func(s *proxyv1alpha1.ProxyConfigSpec) { *s = *orig.DeepCopy() }); err != nil {
			t.Errorf("restoring ProxyConfig default: %v", err)
		}
	}
}

// lcConntrackUDP lists node's UDP conntrack entries to dst.
func lcConntrackUDP(t *testing.T, n *cluster.Node, dst string) string {
	t.Helper()
	out, err := n.NS.Run("conntrack", "-L", "-p", "udp", "--orig-dst", dst)
	if err != nil && !strings.Contains(err.Error(), "0 flow entries") {
		t.Logf("conntrack -L on %s: %v", n.Name, err)
	}
	return out
}
