package agent

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

// inKernel runs the agent with the real kernel applier and conntrack,
// programming the topology's node namespace.
func inKernel(tp *netnstest.Topology, metricsAddress string) func(*Options) {
	return func(o *Options) {
		o.Applier, o.ConntrackDeleter = nil, nil
		o.NetNS = tp.Node.Path()
		o.MetricsAddress = metricsAddress
		if metricsAddress != "0" {
			o.Registry = nil // the one the metrics server serves
		}
	}
}

// webService has TCP 80 and UDP 53 on ClusterIP 10.0.0.10 (envtest's
// Service range is 10.0.0.0/24, whose first 16 addresses the API server
// leaves to fixed ClusterIPs), served by the pods' 8080 and 5353.
func webService(ns string) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "web"},
		Spec: corev1.ServiceSpec{ClusterIP: "10.0.0.10", Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(8080)},
			{Name: "dns", Port: 53, Protocol: corev1.ProtocolUDP, TargetPort: intstr.FromInt32(5353)},
		}},
	}
}

func webSlice(svc *corev1.Service, node string, pods ...*netnstest.Pod) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: svc.Namespace, Name: svc.Name + "-a",
			Labels: map[string]string{discoveryv1.LabelServiceName: svc.Name},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports: []discoveryv1.EndpointPort{
			{Name: ptr.To("http"), Port: ptr.To[int32](8080), Protocol: ptr.To(corev1.ProtocolTCP)},
			{Name: ptr.To("dns"), Port: ptr.To[int32](5353), Protocol: ptr.To(corev1.ProtocolUDP)},
		},
	}
	setPods(sl, node, pods...)
	return sl
}

func setPods(sl *discoveryv1.EndpointSlice, node string, pods ...*netnstest.Pod) {
	sl.Endpoints = nil
	for _, p := range pods {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{p.IPv4.String()}, NodeName: ptr.To(node),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
		})
	}
}

// serversSeen asks addr n times over TCP and returns the servers that
// answered, sorted.
func serversSeen(from *netnstest.NS, addr string, n int) ([]string, error) {
	var out []string
	for range n {
		r, err := from.AskTCP(addr, 2*time.Second)
		if err != nil {
			return nil, err
		}
		if !slices.Contains(out, r.Server) {
			out = append(out, r.Server)
		}
	}
	sort.Strings(out)
	return out, nil
}

// TestAgentInKernel: the real agent against a real API server programs a
// node namespace: a client reaches a ClusterIP's endpoints and follows an
// EndpointSlice change; a UDP client stuck on a removed endpoint is moved
// by conntrack cleanup; /metrics moves.
func TestAgentInKernel(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 3)
	for _, p := range tp.Pods {
		p.ServeTCP(t, ":8080", p.Name)
		p.ServeUDP(t, ":5353", p.Name)
	}
	ns := createNamespace(t)
	metricsAddress := freeLoopbackAddress(t)
	ta := startAgent(t, inKernel(tp, metricsAddress))
	ctx := context.Background()

	svc := webService(ns)
	create(t, svc)
	slice := webSlice(svc, ta.node, tp.Pods[0], tp.Pods[1])
	create(t, slice)
	waitFor(t, 20*time.Second, "the ClusterIP served by pod0 and pod1", func() error {
		got, err := serversSeen(tp.Client, "10.0.0.10:80", 30)
		if err != nil {
			return err
		}
		if !slices.Equal(got, []string{"pod0", "pod1"}) {
			return fmt.Errorf("servers %v", got)
		}
		return nil
	})
	before := scrape(t, metricsAddress)

	// A UDP client that keeps its source port stays on one endpoint.
	var udp *net.UDPConn
	if err := tp.Client.Do(func() error {
		var err error
		udp, err = net.DialUDP("udp", nil, net.UDPAddrFromAddrPort(netip4("10.0.0.10:53")))
		return err
	}); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = udp.Close() }()
	first := askOn(t, udp)
	for range 5 {
		if got := askOn(t, udp); got != first {
			t.Fatalf("UDP client moved from %s to %s with no change", first, got)
		}
	}
	// Remove that endpoint; the others stay. Its pod keeps serving, so
	// only a deleted conntrack entry moves the client.
	var keep []*netnstest.Pod
	for _, p := range tp.Pods {
		if p.Name != first {
			keep = append(keep, p)
		}
	}
	if err := apiClient.Get(ctx, keyOf(slice), slice); err != nil {
		t.Fatal(err)
	}
	setPods(slice, ta.node, keep...)
	if err := apiClient.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	want := []string{keep[0].Name, keep[1].Name}
	waitFor(t, 20*time.Second, "the ClusterIP served by "+strings.Join(want, " and "), func() error {
		got, err := serversSeen(tp.Client, "10.0.0.10:80", 30)
		if err != nil {
			return err
		}
		if !slices.Equal(got, want) {
			return fmt.Errorf("servers %v", got)
		}
		return nil
	})
	// The cleanup follows the write; the client's datagrams keep the
	// entry alive, so without it the client would stay on first.
	waitFor(t, 10*time.Second, "the UDP client to leave removed endpoint "+first, func() error {
		if got := askOn(t, udp); got == first {
			return fmt.Errorf("still reaches %s: its conntrack entry was not deleted", got)
		}
		return nil
	})

	// Metrics moved.
	after := scrape(t, metricsAddress)
	defer func() { checkMetrics(t, before, after) }()

	// The agent stops; the rules stay. An endpoint goes while no agent
	// runs, and the next agent's first write moves its UDP client off it.
	second := askOn(t, udp)
	ta.stop()
	if got, err := serversSeen(tp.Client, "10.0.0.10:80", 10); err != nil {
		t.Fatalf("traffic stopped with the agent: %v", err)
	} else if !slices.Equal(got, want) {
		t.Errorf("servers %v after the agent stopped, want %v", got, want)
	}
	var last []*netnstest.Pod
	for _, p := range keep {
		if p.Name != second {
			last = append(last, p)
		}
	}
	if err := apiClient.Get(ctx, keyOf(slice), slice); err != nil {
		t.Fatal(err)
	}
	setPods(slice, ta.node, last...)
	if err := apiClient.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	startAgent(t, inKernel(tp, "0"), func(o *Options) { o.NodeName, o.ConfigName = ta.node, ta.config })
	waitFor(t, 20*time.Second, "the restarted agent to serve only "+last[0].Name, func() error {
		got, err := serversSeen(tp.Client, "10.0.0.10:80", 20)
		if err != nil {
			return err
		}
		if !slices.Equal(got, []string{last[0].Name}) {
			return fmt.Errorf("servers %v", got)
		}
		return nil
	})
	waitFor(t, 10*time.Second, "the UDP client to leave "+second+", removed while no agent ran", func() error {
		if got := askOn(t, udp); got == second {
			return fmt.Errorf("still reaches %s", got)
		}
		return nil
	})
}

func checkMetrics(t *testing.T, before, after map[string]float64) {
	t.Helper()
	for _, name := range []string{
		"nftproxy_sync_proxy_rules_duration_seconds_count",
		"nftproxy_sync_partial_proxy_rules_duration_seconds_count",
		"nftproxy_sync_proxy_rules_last_timestamp_seconds",
		"nftproxy_conntrack_cleanup_entries_deleted_total",
	} {
		if after[name] <= before[name] {
			t.Errorf("%s did not grow: %v then %v", name, before[name], after[name])
		}
	}
	for _, name := range []string{"nftproxy_services_programmed", "nftproxy_endpoints_programmed", `nftproxy_nftables_objects{kind="chains"}`, "nftproxy_sync_full_proxy_rules_duration_seconds_count", "nftproxy_sync_netlink_messages"} {
		if after[name] <= 0 {
			t.Errorf("%s = %v, want > 0", name, after[name])
		}
	}
	for _, name := range []string{"nftproxy_sync_proxy_rules_nftables_sync_failures_total", "nftproxy_sync_proxy_rules_service_changes_pending", "nftproxy_network_programming_duration_seconds_count"} {
		if _, ok := after[name]; !ok {
			t.Errorf("%s missing from /metrics", name)
		}
	}
}

// TestHealthCheckNodePort: a LoadBalancer Service with
// externalTrafficPolicy Local gets a health check server on its
// healthCheckNodePort, in the node's namespace: 200 with local endpoints,
// 503 without.
func TestHealthCheckNodePort(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 1)
	ns := createNamespace(t)
	ta := startAgent(t, inKernel(tp, "0"))
	ctx := context.Background()

	svc := webService(ns)
	svc.Spec.ClusterIP = ""
	svc.Spec.Type = corev1.ServiceTypeLoadBalancer
	svc.Spec.ExternalTrafficPolicy = corev1.ServiceExternalTrafficPolicyLocal
	svc.Spec.Ports = svc.Spec.Ports[:1]
	create(t, svc)
	if svc.Spec.HealthCheckNodePort == 0 {
		t.Fatal("the API server allocated no healthCheckNodePort")
	}
	slice := webSlice(svc, ta.node, tp.Pods[0])
	create(t, slice)
	url := fmt.Sprintf("http://%s:%d/", tp.NodeIPv4, svc.Spec.HealthCheckNodePort)

	type answer struct {
		code int
		body healthBody
	}
	check := func(what string, want answer) {
		t.Helper()
		waitFor(t, 20*time.Second, what, func() error {
			code, body, err := getFrom(tp.Client, url)
			if err != nil {
				return err
			}
			if got := (answer{code, body}); got != want {
				return fmt.Errorf("got %+v, want %+v", got, want)
			}
			return nil
		})
	}
	check("200 with one local endpoint", answer{200, healthBody{Service: healthService{ns, "web"}, LocalEndpoints: 1, ServiceProxyHealthy: true}})

	if err := apiClient.Get(ctx, keyOf(slice), slice); err != nil {
		t.Fatal(err)
	}
	setPods(slice, "another-node", tp.Pods[0])
	if err := apiClient.Update(ctx, slice); err != nil {
		t.Fatal(err)
	}
	check("503 with the endpoint on another node", answer{503, healthBody{Service: healthService{ns, "web"}, ServiceProxyHealthy: true}})

	if err := apiClient.Delete(ctx, svc); err != nil {
		t.Fatal(err)
	}
	waitFor(t, 20*time.Second, "the health check port closed", func() error {
		if _, _, err := getFrom(tp.Client, url); err == nil {
			return errors.New("still answering")
		}
		return nil
	})
}

type healthService struct{ Namespace, Name string }

type healthBody struct {
	Service             healthService `json:"service"`
	LocalEndpoints      int           `json:"localEndpoints"`
	ServiceProxyHealthy bool          `json:"serviceProxyHealthy"`
}

// getFrom GETs url from inside a namespace.
func getFrom(from *netnstest.NS, url string) (int, healthBody, error) {
	var conn net.Conn
	client := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{
		DisableKeepAlives: true,
		DialContext: func(ctx context.Context, network, addr string) (net.Conn, error) {
			err := from.Do(func() error {
				var err error
				conn, err = (&net.Dialer{Timeout: 2 * time.Second}).DialContext(ctx, network, addr)
				return err
			})
			return conn, err
		},
	}}
	resp, err := client.Get(url)
	if err != nil {
		return 0, healthBody{}, err
	}
	defer func() { _ = resp.Body.Close() }()
	var body healthBody
	raw, _ := io.ReadAll(resp.Body)
	if err := json.Unmarshal(raw, &body); err != nil {
		return resp.StatusCode, body, fmt.Errorf("body %q: %w", raw, err)
	}
	return resp.StatusCode, body, nil
}

// askOn sends one datagram on c and returns the server that answered.
func askOn(t *testing.T, c *net.UDPConn) string {
	t.Helper()
	_ = c.SetDeadline(time.Now().Add(2 * time.Second))
	if _, err := c.Write([]byte("?")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 512)
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("UDP answer: %v", err)
	}
	f := strings.Fields(string(buf[:n]))
	if len(f) == 0 {
		t.Fatalf("malformed UDP answer %q", buf[:n])
	}
	return f[0]
}

func keyOf(o client.Object) client.ObjectKey { return client.ObjectKeyFromObject(o) }

func netip4(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// freeLoopbackAddress is a 127.0.0.1 address with a port free just now.
func freeLoopbackAddress(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = l.Close() }()
	return l.Addr().String()
}

// scrape reads /metrics as a map from series (name and labels, as
// printed) to value.
func scrape(t *testing.T, address string) map[string]float64 {
	t.Helper()
	var out map[string]float64
	waitFor(t, 10*time.Second, "/metrics", func() error {
		resp, err := http.Get("http://" + address + "/metrics")
		if err != nil {
			return err
		}
		defer func() { _ = resp.Body.Close() }()
		raw, err := io.ReadAll(resp.Body)
		if err != nil {
			return err
		}
		if resp.StatusCode != http.StatusOK {
			return fmt.Errorf("status %d: %s", resp.StatusCode, raw)
		}
		out = map[string]float64{}
		for _, line := range strings.Split(string(raw), "\n") {
			if line == "" || strings.HasPrefix(line, "#") {
				continue
			}
			i := strings.LastIndexByte(line, ' ')
			if i < 0 {
				continue
			}
			v, err := strconv.ParseFloat(line[i+1:], 64)
			if err != nil {
				return fmt.Errorf("metrics line %q: %w", line, err)
			}
			out[line[:i]] = v
		}
		return nil
	})
	return out
}
