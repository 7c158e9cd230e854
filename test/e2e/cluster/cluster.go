// Package cluster runs a small Kubernetes cluster on one machine for
// nftproxy's end-to-end tests and demo: a real kube-apiserver and etcd
// (the envtest binaries), node network namespaces joined by a bridge, each
// programmed by the real nftproxy binary with its own kubeconfig and
// --node-name, pod namespaces behind each node serving TCP, UDP and HTTP,
// and clients outside the cluster.
//
// There is no kubelet and no endpoint controller: the cluster writes Nodes
// and EndpointSlices itself (SetEndpoints), with the conditions a real
// cluster would give them. It is plain Go, without testing.TB, so the demo
// can run it as a program; Close removes every namespace and process.
package cluster

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/testenv"
)

// Options shape a cluster.
type Options struct {
	Nodes       int    // node namespaces; default 3
	PodsPerNode int    // default 2
	Agent       string // path of the nftproxy binary; required
	// AgentArgs are added to every agent's command line.
	AgentArgs []string
	// Dir holds kubeconfigs, certificates and the agents' logs; default a
	// new temporary directory, removed by Close.
	Dir string
	// Log, when set, gets a line per step of the bring-up.
	Log io.Writer
}

// Service ranges of the API server, dual-stack.
const serviceRanges = "10.96.0.0/16,fd00:96::/112"

// Cluster is a running cluster.
type Cluster struct {
	Env       *envtest.Environment
	Config    *rest.Config // cluster-admin
	API       client.Client
	Clientset kubernetes.Interface

	Nodes []*Node
	// Client is outside the cluster, at ClientIPv4/ClientIPv6; Stranger
	// too, at StrangerIPv4/6, for "from somewhere else" (a source range
	// that excludes it).
	Client, Stranger *netnstest.NS

	opts    Options
	dir     string
	ownDir  bool
	net     *network
	servers []*netnstest.Server
}

// Node is a node namespace and the agent that programs it.
type Node struct {
	Name       string // the Node object's name: "node0", …
	NS         *netnstest.NS
	IPv4, IPv6 netip.Addr // on the fabric
	PodCIDRs   []netip.Prefix
	Zone       string
	Pods       []*Pod
	Agent      *Agent

	cluster    *Cluster
	kubeconfig string
}

// Pod is a namespace behind a node, serving EchoPort, DNSPort and
// HTTPPort.
type Pod struct {
	*netnstest.NS
	Name       string // "node0-pod1": what its servers answer with
	Node       *Node
	IPv4, IPv6 netip.Addr
}

// Start brings a cluster up, and removes whatever it built if it fails.
func Start(ctx context.Context, opts Options) (c *Cluster, err error) {
	if opts.Nodes == 0 {
		opts.Nodes = 3
	}
	if opts.PodsPerNode == 0 {
		opts.PodsPerNode = 2
	}
	if opts.Agent == "" {
		return nil, errors.New("cluster: Options.Agent, the nftproxy binary, is required")
	}
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		return nil, errors.New("KUBEBUILDER_ASSETS is not set: it names kube-apiserver and etcd (hack/envtest-assets.sh builds them)")
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("needs root, to create network namespaces")
	}
	c = &Cluster{opts: opts, dir: opts.Dir}
	defer func() {
		if err != nil {
			_ = c.Close()
			c = nil
		}
	}()
	if c.dir == "" {
		sweepStale()
		if c.dir, err = os.MkdirTemp("", "nftproxy-e2e-"); err != nil {
			return c, err
		}
		c.ownDir = true
		if err := os.WriteFile(filepath.Join(c.dir, ownerFile), []byte(strconv.Itoa(os.Getpid())), 0o644); err != nil {
			return c, err
		}
	}
	c.logf("starting kube-apiserver and etcd")
	if err := c.startAPI(ctx); err != nil {
		return c, err
	}
	c.logf("building %d nodes with %d pods each", opts.Nodes, opts.PodsPerNode)
	if err := c.buildNetwork(); err != nil {
		return c, err
	}
	if err := c.startServers(); err != nil {
		return c, err
	}
	if err := c.waitRoutes(ctx); err != nil {
		return c, err
	}
	if err := c.registerNodes(ctx); err != nil {
		return c, err
	}
	c.logf("starting an nftproxy agent on each node")
	for _, n := range c.Nodes {
		if err := n.StartAgent(); err != nil {
			return c, err
		}
	}
	for _, n := range c.Nodes {
		if err := n.Agent.WaitReady(ctx, time.Minute); err != nil {
			return c, err
		}
	}
	c.logf("cluster up")
	return c, nil
}

func (c *Cluster) logf(format string, args ...any) {
	if c.opts.Log != nil {
		_, _ = fmt.Fprintf(c.opts.Log, format+"\n", args...)
	}
}

// Dir is the cluster's working directory (kubeconfigs, agent logs).
func (c *Cluster) Dir() string { return c.dir }

// Kubeconfig is the path of a cluster-admin kubeconfig.
func (c *Cluster) Kubeconfig() string { return filepath.Join(c.dir, "admin.kubeconfig") }

// startAPI starts the API server (dual-stack Service ranges; certificates
// in our directory, so that it can be stopped and started again with the
// same identity), installs the agents' RBAC from config/default, an
// identity per node bound by it, and the ProxyConfig.
func (c *Cluster) startAPI(ctx context.Context) error {
	c.Env = testenv.NewEnvironment()
	// kube-apiserver does not exit on SIGTERM while clients hold watches
	// open; envtest kills it after this (see StopAPIServer).
	c.Env.ControlPlaneStopTimeout = 3 * time.Second
	apiserver := c.Env.ControlPlane.GetAPIServer()
	apiserver.CertDir = filepath.Join(c.dir, "apiserver")
	if err := os.MkdirAll(apiserver.CertDir, 0o700); err != nil {
		return err
	}
	apiserver.Configure().Set("service-cluster-ip-range", serviceRanges)
	c.Env.ControlPlane.Etcd = &envtest.Etcd{DataDir: filepath.Join(c.dir, "etcd")}
	if _, err := c.Env.Start(); err != nil {
		c.Env = nil
		return fmt.Errorf("starting the API server: %w", err)
	}
	admin, err := c.Env.AddUser(envtest.User{Name: "e2e-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return err
	}
	raw, err := admin.KubeConfig()
	if err != nil {
		return err
	}
	if err := os.WriteFile(c.Kubeconfig(), raw, 0o600); err != nil {
		return err
	}
	c.Config = admin.Config()
	if c.API, err = client.New(c.Config, client.Options{Scheme: c.Env.Scheme}); err != nil {
		return err
	}
	if c.Clientset, err = kubernetes.NewForConfig(c.Config); err != nil {
		return err
	}
	objects, err := testenv.Render("config/default")
	if err != nil {
		return err
	}
	for _, kinds := range [][]string{{"Namespace"}, {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}} {
		for _, o := range objects {
			if slices.Contains(kinds, o.GetKind()) {
				if err := c.API.Create(ctx, o); err != nil {
					return fmt.Errorf("creating %s %s: %w", o.GetKind(), o.GetName(), err)
				}
			}
		}
	}
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
	for _, p := range ClusterCIDRs {
		pc.Spec.ClusterCIDRs = append(pc.Spec.ClusterCIDRs, proxyv1alpha1.CIDR(p.String()))
	}
	if err := c.API.Create(ctx, pc); err != nil {
		return fmt.Errorf("creating ProxyConfig default: %w", err)
	}
	return nil
}

// buildNetwork creates the namespaces and links of the picture in
// network.go.
func (c *Cluster) buildNetwork() error {
	c.net = newNetwork()
	n := c.net
	fabric, err := n.add("fabric")
	if err != nil {
		return err
	}
	if err := run("ip", "-n", fabric.Name, "link", "add", "br0", "type", "bridge"); err != nil {
		return err
	}
	if err := run("ip", "-n", fabric.Name, "link", "set", "br0", "up"); err != nil {
		return err
	}
	// attach joins ns to the fabric as eth0 with the given addresses.
	attach := func(ns *netnstest.NS, port string, a4, a6 netip.Addr) error {
		if err := n.link(ns, "eth0", fabric, port); err != nil {
			return err
		}
		if err := run("ip", "-n", fabric.Name, "link", "set", port, "master", "br0"); err != nil {
			return err
		}
		return addrs(ns, "eth0", netip.PrefixFrom(a4, 24), netip.PrefixFrom(a6, 64))
	}

	// The gateway drops what reaches it: no forwarding, blackhole defaults.
	gw, err := n.add("gateway")
	if err != nil {
		return err
	}
	if err := attach(gw, "gateway", gatewayIPv4, gatewayIPv6); err != nil {
		return err
	}
	for _, family := range []string{"-4", "-6"} {
		if err := run("ip", "-n", gw.Name, family, "route", "add", "blackhole", "default"); err != nil {
			return err
		}
	}

	for i := range c.opts.Nodes {
		node := &Node{
			Name:     fmt.Sprintf("node%d", i),
			IPv4:     nodeIPv4(i),
			IPv6:     nodeIPv6(i),
			PodCIDRs: []netip.Prefix{podCIDRv4(i), podCIDRv6(i)},
			Zone:     fmt.Sprintf("zone-%c", 'a'+i),
			cluster:  c,
		}
		if node.NS, err = n.add(node.Name); err != nil {
			return err
		}
		if err := c.buildNode(node, attach); err != nil {
			return err
		}
		c.Nodes = append(c.Nodes, node)
	}
	// Each node routes the others' pod ranges to them.
	for _, node := range c.Nodes {
		for _, other := range c.Nodes {
			if other == node {
				continue
			}
			if err := route(node.NS, other.PodCIDRs[0].String(), other.IPv4); err != nil {
				return err
			}
			if err := route(node.NS, other.PodCIDRs[1].String(), other.IPv6); err != nil {
				return err
			}
		}
	}

	for _, client := range []struct {
		ns     **netnstest.NS
		role   string
		a4, a6 netip.Addr
	}{{&c.Client, "client", ClientIPv4, ClientIPv6}, {&c.Stranger, "stranger", StrangerIPv4, StrangerIPv6}} {
		ns, err := n.add(client.role)
		if err != nil {
			return err
		}
		if err := attach(ns, client.role, client.a4, client.a6); err != nil {
			return err
		}
		if err := route(ns, "default", gatewayIPv4); err != nil {
			return err
		}
		if err := route(ns, "default", gatewayIPv6); err != nil {
			return err
		}
		for _, p := range ExternalRanges {
			via := c.Nodes[0].IPv4
			if p.Addr().Is6() {
				via = c.Nodes[0].IPv6
			}
			if err := route(ns, p.String(), via); err != nil {
				return err
			}
		}
		*client.ns = ns
	}
	return nil
}

// buildNode makes node a router with a pod bridge and its pods.
func (c *Cluster) buildNode(node *Node, attach func(*netnstest.NS, string, netip.Addr, netip.Addr) error) error {
	ns := node.NS
	// A router whose ICMP errors (the proxy's rejects among them) are not
	// rate limited, and, as on a real node, with bridged pod traffic
	// passing netfilter when the kernel has br_netfilter (loading it is
	// not ours to do).
	if err := ns.SetSysctls(
		"net.ipv4.ip_forward", "1", "net.ipv6.conf.all.forwarding", "1",
		"net.ipv4.icmp_ratelimit", "0", "net.ipv6.icmp.ratelimit", "0"); err != nil {
		return err
	}
	if _, err := os.Stat("/proc/sys/net/bridge/bridge-nf-call-iptables"); err == nil {
		if err := ns.SetSysctls("net.bridge.bridge-nf-call-iptables", "1", "net.bridge.bridge-nf-call-ip6tables", "1"); err != nil {
			return err
		}
	}
	if err := attach(ns, node.Name, node.IPv4, node.IPv6); err != nil {
		return err
	}
	if err := route(ns, "default", gatewayIPv4); err != nil {
		return err
	}
	if err := route(ns, "default", gatewayIPv6); err != nil {
		return err
	}
	if err := run("ip", "-n", ns.Name, "link", "add", "cbr0", "type", "bridge"); err != nil {
		return err
	}
	gw4, gw6 := host(node.PodCIDRs[0], 1), host(node.PodCIDRs[1], 1)
	if err := addrs(ns, "cbr0", netip.PrefixFrom(gw4, 24), netip.PrefixFrom(gw6, 64)); err != nil {
		return err
	}
	if err := run("ip", "-n", ns.Name, "link", "set", "cbr0", "up"); err != nil {
		return err
	}
	for k := range c.opts.PodsPerNode {
		pod := &Pod{
			Name: fmt.Sprintf("%s-pod%d", node.Name, k),
			Node: node,
			IPv4: host(node.PodCIDRs[0], 10+k),
			IPv6: host(node.PodCIDRs[1], 10+k),
		}
		var err error
		if pod.NS, err = c.net.add(pod.Name); err != nil {
			return err
		}
		peer := fmt.Sprintf("pod%d", k)
		if err := c.net.link(pod.NS, "eth0", ns, peer); err != nil {
			return err
		}
		// Hairpin mode, as kubelet's bridge sets it: a pod reaching
		// itself through a Service is bridged back out of its own port.
		if err := run("ip", "-n", ns.Name, "link", "set", peer, "master", "cbr0"); err != nil {
			return err
		}
		if err := run("ip", "-n", ns.Name, "link", "set", peer, "type", "bridge_slave", "hairpin", "on"); err != nil {
			return err
		}
		if err := addrs(pod.NS, "eth0", netip.PrefixFrom(pod.IPv4, 24), netip.PrefixFrom(pod.IPv6, 64)); err != nil {
			return err
		}
		if err := route(pod.NS, "default", gw4); err != nil {
			return err
		}
		if err := route(pod.NS, "default", gw6); err != nil {
			return err
		}
		node.Pods = append(node.Pods, pod)
	}
	return nil
}

// startServers starts every pod's servers.
func (c *Cluster) startServers() error {
	for _, pod := range c.Pods() {
		for _, listen := range []func(string, string) (*netnstest.Server, error){pod.ListenTCP, pod.ListenUDP} {
			for _, port := range []int{EchoPort, DNSPort} {
				s, err := listen(fmt.Sprintf(":%d", port), pod.Name)
				if err != nil {
					return err
				}
				c.servers = append(c.servers, s)
			}
		}
		s, err := pod.ListenHTTP(fmt.Sprintf(":%d", HTTPPort), pod.Name)
		if err != nil {
			return err
		}
		c.servers = append(c.servers, s)
	}
	return nil
}

// waitRoutes waits until every node reaches every pod, on both families:
// links come up asynchronously.
func (c *Cluster) waitRoutes(ctx context.Context) error {
	deadline := time.Now().Add(15 * time.Second)
	for _, node := range c.Nodes {
		for _, pod := range c.Pods() {
			for _, a := range []netip.Addr{pod.IPv4, pod.IPv6} {
				target := netip.AddrPortFrom(a, EchoPort).String()
				for {
					_, err := node.NS.AskTCP(target, time.Second)
					if err == nil {
						break
					}
					if time.Now().After(deadline) || ctx.Err() != nil {
						return fmt.Errorf("network not ready: %w", err)
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
		}
	}
	return nil
}

// registerNodes creates the Node objects: addresses, pod ranges, zones.
func (c *Cluster) registerNodes(ctx context.Context) error {
	for _, n := range c.Nodes {
		node := &corev1.Node{
			ObjectMeta: metav1.ObjectMeta{
				Name:   n.Name,
				Labels: map[string]string{corev1.LabelTopologyZone: n.Zone, corev1.LabelHostname: n.Name},
			},
		}
		for _, p := range n.PodCIDRs {
			node.Spec.PodCIDRs = append(node.Spec.PodCIDRs, p.String())
		}
		node.Spec.PodCIDR = node.Spec.PodCIDRs[0]
		if err := c.API.Create(ctx, node); err != nil {
			return fmt.Errorf("creating Node %s: %w", n.Name, err)
		}
		node.Status.Addresses = []corev1.NodeAddress{
			{Type: corev1.NodeInternalIP, Address: n.IPv4.String()},
			{Type: corev1.NodeInternalIP, Address: n.IPv6.String()},
			{Type: corev1.NodeHostName, Address: n.Name},
		}
		node.Status.Conditions = []corev1.NodeCondition{{Type: corev1.NodeReady, Status: corev1.ConditionTrue, LastHeartbeatTime: metav1.Now()}}
		if err := c.API.Status().Update(ctx, node); err != nil {
			return fmt.Errorf("updating Node %s status: %w", n.Name, err)
		}
	}
	return nil
}

// Pods lists every pod, node by node.
func (c *Cluster) Pods() []*Pod {
	var pods []*Pod
	for _, n := range c.Nodes {
		pods = append(pods, n.Pods...)
	}
	return pods
}

// StopAPIServer stops kube-apiserver (etcd keeps running); StartAPIServer
// starts it again, on the same address with the same certificates. It
// sends SIGTERM and, as the agents' watches keep the server from exiting,
// SIGKILL a few seconds later: envtest reports that as a timeout, which is
// the expected way for it to stop here.
func (c *Cluster) StopAPIServer() error {
	err := c.Env.ControlPlane.APIServer.Stop()
	if err != nil && strings.Contains(err.Error(), "timeout waiting for process") {
		return nil
	}
	return err
}

// StartAPIServer restarts the API server StopAPIServer stopped.
func (c *Cluster) StartAPIServer() error { return c.Env.ControlPlane.APIServer.Start() }

// Close stops the agents (SIGKILL: their rules go with the namespaces),
// the servers and the API server, deletes every namespace and, if Start
// made it, the working directory.
func (c *Cluster) Close() error {
	var errs []error
	for _, n := range c.Nodes {
		if n.Agent != nil {
			n.Agent.Kill()
		}
	}
	for _, s := range c.servers {
		errs = append(errs, s.Close())
	}
	if c.net != nil {
		errs = append(errs, c.net.close())
	}
	if c.Env != nil {
		errs = append(errs, c.Env.Stop())
	}
	if c.ownDir {
		errs = append(errs, os.RemoveAll(c.dir))
	}
	return errors.Join(errs...)
}
