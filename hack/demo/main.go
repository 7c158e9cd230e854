// Command demo shows nftproxy working, on this machine, with no cluster:
// it brings up the end-to-end tests' cluster of network namespaces (a real
// kube-apiserver and etcd, nodes each running the real nftproxy agent,
// pods serving TCP, UDP and HTTP, a client outside the cluster), creates a
// couple of example Services, sends traffic to a ClusterIP and a NodePort
// and shows how it spreads across the pods, prints the table the agent
// wrote, and stays up until Ctrl-C so you can look around. Everything it
// created is removed when it exits. It needs root (`make demo`).
//
//	go run ./hack/demo [--agent bin/nftproxy] [--once] [--nodes 2] [--pods 2]
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"sort"
	"strings"
	"syscall"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

func main() {
	agent := flag.String("agent", "bin/nftproxy", "Path of the nftproxy binary to run on each node.")
	once := flag.Bool("once", false, "Exit after one pass instead of staying up until Ctrl-C.")
	nodes := flag.Int("nodes", 2, "Nodes in the cluster.")
	pods := flag.Int("pods", 2, "Pods on each node.")
	requests := flag.Int("requests", 40, "Requests sent to each Service address shown.")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *agent, *nodes, *pods, *requests, *once); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, agent string, nodes, pods, requests int, once bool) (err error) {
	if _, err := os.Stat(agent); err != nil {
		return fmt.Errorf("no agent binary: %w (`make demo` builds it)", err)
	}
	fmt.Println("== Bringing up a cluster in network namespaces")
	c, err := cluster.Start(ctx, cluster.Options{Agent: agent, Nodes: nodes, PodsPerNode: pods, Log: prefixed(os.Stdout, "   ")})
	if err != nil {
		return err
	}
	defer func() {
		fmt.Println("\n== Removing the cluster")
		err = errors.Join(err, c.Close())
	}()
	if err := ctx.Err(); err != nil {
		return nil // interrupted while starting
	}

	web, dns, err := createServices(ctx, c)
	if err != nil {
		return err
	}
	podClient := c.Nodes[len(c.Nodes)-1].Pods[0]
	nodePort := web.Spec.Ports[0].NodePort

	fmt.Printf("\n== Service demo/web: ClusterIP %s port 80, NodePort %d, endpoints: every pod (HTTP)\n", web.Spec.ClusterIP, nodePort)
	if err := spread(ctx, fmt.Sprintf("from pod %s to http://%s/", podClient.Name, web.Spec.ClusterIP), requests,
		func() (netnstest.Reply, error) {
			return podClient.AskHTTP("http://"+web.Spec.ClusterIP+"/", 2*time.Second)
		}); err != nil {
		return err
	}
	for _, n := range c.Nodes {
		url := fmt.Sprintf("http://%s:%d/", n.IPv4, nodePort)
		if err := spread(ctx, fmt.Sprintf("from the client %s (outside the cluster) to %s", cluster.ClientIPv4, url), requests,
			func() (netnstest.Reply, error) { return c.Client.AskHTTP(url, 2*time.Second) }); err != nil {
			return err
		}
	}
	fmt.Println("   (a pod sees the client's own address; from outside, the node's address: NodePort traffic is masqueraded)")

	fmt.Printf("\n== Service demo/dns: ClusterIP %s, 53/UDP and 53/TCP, endpoints: %s and %s\n", dns.Spec.ClusterIP, c.Nodes[0].Pods[0].Name, c.Nodes[len(c.Nodes)-1].Pods[len(c.Nodes[len(c.Nodes)-1].Pods)-1].Name)
	dnsAddr := fmt.Sprintf("%s:53", dns.Spec.ClusterIP)
	if err := spread(ctx, fmt.Sprintf("from pod %s, UDP %s", c.Nodes[0].Pods[0].Name, dnsAddr), requests,
		func() (netnstest.Reply, error) { return c.Nodes[0].Pods[0].AskUDP(dnsAddr, 2*time.Second) }); err != nil {
		return err
	}
	if err := spread(ctx, fmt.Sprintf("from node %s, TCP %s", c.Nodes[0].Name, dnsAddr), requests,
		func() (netnstest.Reply, error) { return c.Nodes[0].NS.AskTCP(dnsAddr, 2*time.Second) }); err != nil {
		return err
	}

	node := c.Nodes[0]
	fmt.Printf("\n== The table nftproxy wrote on %s (nft list table inet nftproxy)\n", node.Name)
	if table, err := node.NS.Run("nft", "list", "table", "inet", "nftproxy"); err != nil {
		fmt.Printf("   (cannot list it: %v; install nftables for the nft command)\n", err)
	} else {
		fmt.Print(table)
	}

	if once {
		return nil
	}
	fmt.Printf("\n== Up until Ctrl-C. Look around, in another shell (as root):\n"+
		"   ip netns exec %s curl http://%s:%d/            # the client, through a NodePort\n"+
		"   ip netns exec %s nft list table inet nftproxy   # %s's rules\n"+
		"   kubectl --kubeconfig %s get services,endpointslices -n demo\n"+
		"   kubectl --kubeconfig %s get proxyconfig default   # status: nodes reporting\n"+
		"   tail -f %s   # %s's agent log\n",
		c.Client.Name, node.IPv4, nodePort, node.NS.Name, node.Name, c.Kubeconfig(), c.Kubeconfig(), node.Agent.LogPath, node.Name)
	<-ctx.Done()
	return nil
}

// createServices creates the example Services and their endpoints.
func createServices(ctx context.Context, c *cluster.Cluster) (web, dns *corev1.Service, err error) {
	if err := c.API.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "demo"}}); err != nil {
		return nil, nil, err
	}
	web = &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "web"},
		Spec: corev1.ServiceSpec{
			Type:  corev1.ServiceTypeNodePort,
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromString("http")}},
		},
	}
	dns = &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: "demo", Name: "dns"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromString("dns")},
			{Name: "dns-tcp", Port: 53, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromString("dns-tcp")},
		}},
	}
	all := c.Pods()
	for _, s := range []struct {
		svc  *corev1.Service
		pods []*cluster.Pod
	}{{web, all}, {dns, []*cluster.Pod{all[0], all[len(all)-1]}}} {
		if err := c.API.Create(ctx, s.svc); err != nil {
			return nil, nil, fmt.Errorf("creating Service %s: %w", s.svc.Name, err)
		}
		if err := c.WaitProgrammed(ctx, s.svc, 30*time.Second); err != nil {
			return nil, nil, err
		}
		if err := c.SetEndpoints(ctx, s.svc, cluster.ReadyPods(s.pods...)); err != nil {
			return nil, nil, err
		}
	}
	return web, dns, nil
}

// spread sends requests and prints which pod answered how often, and the
// source address it saw. The agents take milliseconds to program a new
// Service; the first requests may come before that, so it waits for the
// first answer.
func spread(ctx context.Context, what string, requests int, ask func() (netnstest.Reply, error)) error {
	deadline := time.Now().Add(30 * time.Second)
	for {
		_, err := ask()
		if err == nil {
			break
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("%s: no answer: %w", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
	counts := map[string]int{}
	sources := map[string]string{}
	for range requests {
		r, err := ask()
		if err != nil {
			return fmt.Errorf("%s: %w", what, err)
		}
		counts[r.Server]++
		sources[r.Server] = r.Source.String()
	}
	names := make([]string, 0, len(counts))
	for n := range counts {
		names = append(names, n)
	}
	sort.Strings(names)
	fmt.Printf("   %s: %d requests\n", what, requests)
	for _, n := range names {
		fmt.Printf("     %-12s %3d  %s  (saw the request come from %s)\n", n, counts[n], strings.Repeat("#", counts[n]), sources[n])
	}
	return nil
}

// prefixed indents each line written to w.
func prefixed(w io.Writer, prefix string) io.Writer {
	return writerFunc(func(p []byte) (int, error) {
		_, err := io.WriteString(w, prefix+string(p))
		return len(p), err
	})
}

type writerFunc func([]byte) (int, error)

func (f writerFunc) Write(p []byte) (int, error) { return f(p) }
