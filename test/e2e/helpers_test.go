package e2e

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"regexp"
	"slices"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/e2e/cluster"
)

const (
	// converge bounds the wait for the agents to program a change; they
	// take milliseconds, the rest is slack for a loaded machine.
	converge = 30 * time.Second
	// answer bounds one request that should succeed.
	answer = 2 * time.Second
)

// namespace creates a Kubernetes namespace for the test, named after it;
// at the end the test's Services and EndpointSlices are deleted (envtest
// has no namespace controller to do it), so their rules go too.
func namespace(t *testing.T, c *cluster.Cluster) string {
	t.Helper()
	name := strings.ToLower(regexp.MustCompile(`[^a-zA-Z0-9]+`).ReplaceAllString(t.Name(), "-"))
	name = strings.Trim(name, "-")
	if len(name) > 50 {
		name = name[:50]
	}
	name = fmt.Sprintf("%s-%d", strings.Trim(name, "-"), time.Now().UnixNano()%100000)
	ctx := context.Background()
	if err := c.API.Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.API.DeleteAllOf(ctx, &discoveryv1.EndpointSlice{}, client.InNamespace(name)); err != nil {
			t.Errorf("deleting EndpointSlices: %v", err)
		}
		var svcs corev1.ServiceList
		if err := c.API.List(ctx, &svcs, client.InNamespace(name)); err != nil {
			t.Errorf("listing Services: %v", err)
		}
		for i := range svcs.Items {
			if err := c.API.Delete(ctx, &svcs.Items[i]); err != nil {
				t.Errorf("deleting Service: %v", err)
			}
		}
	})
	return name
}

// tcpPort is a Service port on TCP to targetPort.
func tcpPort(name string, port int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, Protocol: corev1.ProtocolTCP, TargetPort: target}
}

// udpPort is a Service port on UDP to targetPort.
func udpPort(name string, port int32, target intstr.IntOrString) corev1.ServicePort {
	return corev1.ServicePort{Name: name, Port: port, Protocol: corev1.ProtocolUDP, TargetPort: target}
}

// createService creates svc in namespace ns and returns it as the API
// server stored it (ClusterIPs, NodePorts and families allocated), once
// every node has programmed it (see cluster.WaitProgrammed for why).
func createService(t *testing.T, c *cluster.Cluster, ns string, svc *corev1.Service) *corev1.Service {
	t.Helper()
	svc.Namespace = ns
	if err := c.API.Create(context.Background(), svc); err != nil {
		t.Fatalf("creating Service %s: %v", svc.Name, err)
	}
	if err := c.WaitProgrammed(context.Background(), svc, converge); err != nil {
		t.Fatal(err)
	}
	return svc
}

// updateService reads the Service, applies mutate and writes it back,
// retrying on conflicts; it returns the stored result.
func updateService(t *testing.T, c *cluster.Cluster, svc *corev1.Service, mutate func(*corev1.Service)) *corev1.Service {
	t.Helper()
	ctx := context.Background()
	for range 5 {
		var cur corev1.Service
		if err := c.API.Get(ctx, client.ObjectKeyFromObject(svc), &cur); err != nil {
			t.Fatal(err)
		}
		mutate(&cur)
		err := c.API.Update(ctx, &cur)
		if err == nil {
			return &cur
		}
		t.Logf("updating Service %s: %v", svc.Name, err)
	}
	t.Fatalf("could not update Service %s", svc.Name)
	return nil
}

// setEndpoints writes svc's EndpointSlices.
func setEndpoints(t *testing.T, c *cluster.Cluster, svc *corev1.Service, eps []cluster.Endpoint) {
	t.Helper()
	if err := c.SetEndpoints(context.Background(), svc, eps); err != nil {
		t.Fatal(err)
	}
}

// eventually retries check until it passes or converge runs out.
func eventually(t *testing.T, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(converge)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %v: %v", what, converge, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// ask is one request; the tests pass the client, namespace and target.
type ask func() (netnstest.Reply, error)

func askTCP(from *netnstest.NS, addr string) ask {
	return func() (netnstest.Reply, error) { return from.AskTCP(addr, answer) }
}

func askUDP(from *netnstest.NS, addr string) ask {
	return func() (netnstest.Reply, error) { return from.AskUDP(addr, answer) }
}

func askHTTP(from *netnstest.NS, url string) ask {
	return func() (netnstest.Reply, error) { return from.AskHTTP(url, answer) }
}

// reaches waits until asking reaches every one of want (pod names, by
// repeated requests: the proxy picks at random) and nothing else; it
// returns the last reply of each server.
func reaches(t *testing.T, what string, a ask, want ...*cluster.Pod) map[string]netnstest.Reply {
	t.Helper()
	names := podNames(want)
	var seen map[string]netnstest.Reply
	eventually(t, what, func() error {
		seen = map[string]netnstest.Reply{}
		for range 20 * len(want) {
			r, err := a()
			if err != nil {
				return err
			}
			if !slices.Contains(names, r.Server) {
				return fmt.Errorf("answered by %s, want one of %v", r.Server, names)
			}
			seen[r.Server] = r
			if len(seen) == len(want) {
				return nil
			}
		}
		return fmt.Errorf("reached only %v of %v", keys(seen), names)
	})
	return seen
}

// onlyReaches checks, after convergence, that n requests all succeed and
// all land on want.
func onlyReaches(t *testing.T, what string, a ask, n int, want ...*cluster.Pod) {
	t.Helper()
	if _, err := sample(a, n, want); err != nil {
		t.Fatalf("%s: %v", what, err)
	}
}

// sample asks n times and counts the answers by server; it fails at the
// first error or answer from a server not in want.
func sample(a ask, n int, want []*cluster.Pod) (map[string]int, error) {
	names := podNames(want)
	seen := map[string]int{}
	for range n {
		r, err := a()
		if err != nil {
			return seen, err
		}
		if !slices.Contains(names, r.Server) {
			return seen, fmt.Errorf("answered by %s, want one of %v", r.Server, names)
		}
		seen[r.Server]++
	}
	return seen, nil
}

// refused waits until asking is refused at once (a reject: TCP reset or
// ICMP unreachable), and not timed out.
func refused(t *testing.T, what string, a ask) {
	t.Helper()
	eventually(t, what, func() error {
		start := time.Now()
		r, err := a()
		switch {
		case err == nil:
			return fmt.Errorf("answered by %s", r)
		case isRefused(err):
			if d := time.Since(start); d > time.Second {
				return fmt.Errorf("refused, but only after %v", d)
			}
			return nil
		default:
			return fmt.Errorf("not refused: %w", err)
		}
	})
}

// dropped waits until asking gets no answer at all (packets dropped).
func dropped(t *testing.T, what string, a ask) {
	t.Helper()
	eventually(t, what, func() error {
		r, err := a()
		switch {
		case err == nil:
			return fmt.Errorf("answered by %s", r)
		case !errors.Is(err, os.ErrDeadlineExceeded):
			return fmt.Errorf("failed, but not by a timeout: %w", err)
		}
		return nil
	})
}

func isRefused(err error) bool {
	return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.EHOSTUNREACH) ||
		errors.Is(err, syscall.ENETUNREACH) || errors.Is(err, syscall.EACCES) || errors.Is(err, syscall.EPERM)
}

func podNames(pods []*cluster.Pod) []string {
	names := make([]string, len(pods))
	for i, p := range pods {
		names[i] = p.Name
	}
	return names
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// hostPort joins an address (a Service's ClusterIP string or a netip.Addr)
// and a port.
func hostPort[A string | netip.Addr](addr A, port int32) string {
	return net.JoinHostPort(fmt.Sprint(addr), fmt.Sprint(port))
}

// clusterIP is svc's ClusterIP of the family.
func clusterIP(t *testing.T, svc *corev1.Service, family corev1.IPFamily) string {
	t.Helper()
	for _, ip := range svc.Spec.ClusterIPs {
		if a, err := netip.ParseAddr(ip); err == nil && a.Is6() == (family == corev1.IPv6Protocol) {
			return ip
		}
	}
	t.Fatalf("Service %s has no %s ClusterIP: %v", svc.Name, family, svc.Spec.ClusterIPs)
	return ""
}
