package agent

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/netip"
	"os"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	eventsv1 "k8s.io/api/events/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/dataplane"
	"github.com/nftproxy/nftproxy/internal/conntrack"
	"github.com/nftproxy/nftproxy/test/testenv"
)

// These tests run agents against one real API server (envtest) with a
// recording applier in place of the kernel.

var (
	apiConfig *rest.Config
	apiClient client.Client
)

func TestMain(m *testing.M) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		fmt.Println("KUBEBUILDER_ASSETS is not set: skipping the agent's envtest tests (run `make test`)")
		if os.Getenv("CI") != "" {
			os.Exit(1)
		}
		os.Exit(0)
	}
	env := testenv.NewEnvironment()
	cfg, err := env.Start()
	if err != nil {
		fmt.Fprintln(os.Stderr, "starting envtest:", err)
		os.Exit(1)
	}
	apiConfig = cfg
	apiClient, err = client.New(cfg, client.Options{Scheme: env.Scheme})
	code := 1
	if err == nil {
		code = m.Run()
	} else {
		fmt.Fprintln(os.Stderr, err)
	}
	if err := env.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "stopping envtest:", err)
	}
	os.Exit(code)
}

// recordingApplier records every ruleset written and can be told to fail.
type recordingApplier struct {
	mu       sync.Mutex
	writes   []*dataplane.Ruleset
	replaces int
	fail     error
	failing  int // calls left to fail; -1 fails until fail is cleared
}

func (r *recordingApplier) write(rs *dataplane.Ruleset, replace bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.fail != nil && r.failing != 0 {
		if r.failing > 0 {
			r.failing--
		}
		return r.fail
	}
	if replace {
		r.replaces++
	}
	r.writes = append(r.writes, rs)
	return nil
}

func (r *recordingApplier) Apply(_ context.Context, rs *dataplane.Ruleset) error {
	return r.write(rs, false)
}

func (r *recordingApplier) Replace(_ context.Context, rs *dataplane.Ruleset) error {
	return r.write(rs, true)
}

func (r *recordingApplier) Cleanup(context.Context) error { return nil }

// recordingDeleter stands for the kernel's conntrack table.
type recordingDeleter struct {
	mu    sync.Mutex
	flows []conntrack.Flow
}

func (d *recordingDeleter) DeleteStale(context.Context, []conntrack.Frontend) (int, error) {
	return 0, nil
}

func (d *recordingDeleter) Delete(_ context.Context, flows []conntrack.Flow) (int, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.flows = append(d.flows, flows...)
	return 0, nil
}

func (r *recordingApplier) failNext(n int, err error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.failing, r.fail = n, err
}

func (r *recordingApplier) stats() (writes, replaces int, last *dataplane.Ruleset) {
	r.mu.Lock()
	defer r.mu.Unlock()
	if len(r.writes) > 0 {
		last = r.writes[len(r.writes)-1]
	}
	return len(r.writes), r.replaces, last
}

type testAgent struct {
	deleter recordingDeleter
	*Agent
	applier *recordingApplier
	node    string
	config  string
	// stop stops the agent (at the test's end if not before).
	stop func()
}

// startAgent runs an agent for a node and a ProxyConfig of the test's own
// names until the test ends.
func startAgent(t *testing.T, mutate ...func(*Options)) *testAgent {
	t.Helper()
	name := strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-"))
	ta := &testAgent{applier: &recordingApplier{}, node: "node-" + name, config: "config-" + name}
	opts := Options{
		RESTConfig: apiConfig, Scheme: testenv.Scheme(),
		NodeName: ta.node, ConfigName: ta.config,
		MetricsAddress: "0", HealthProbeAddress: "0",
		Applier: ta.applier, Registry: prometheus.NewRegistry(),
		// Never the host's conntrack table.
		ConntrackDeleter: &ta.deleter,
	}
	for _, m := range mutate {
		m(&opts)
	}
	ta.node, ta.config = opts.NodeName, opts.ConfigName
	ctx, cancel := context.WithCancel(context.Background())
	a, err := New(ctx, opts)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	ta.Agent = a
	done := make(chan error, 1)
	go func() { done <- a.Start(ctx) }()
	var once sync.Once
	ta.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("agent: %v", err)
			}
		})
	}
	t.Cleanup(ta.stop)
	return ta
}

// lastWith waits until the last ruleset written satisfies check.
func (ta *testAgent) lastWith(t *testing.T, what string, check func(*dataplane.Ruleset) error) *dataplane.Ruleset {
	t.Helper()
	var rs *dataplane.Ruleset
	waitFor(t, 20*time.Second, what, func() error {
		_, _, rs = ta.applier.stats()
		if rs == nil {
			return errors.New("nothing written yet")
		}
		return check(rs)
	})
	return rs
}

func waitFor(t *testing.T, timeout time.Duration, what string, check func() error) {
	t.Helper()
	deadline := time.Now().Add(timeout)
	for {
		err := check()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: still failing after %s: %v", what, timeout, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func createNamespace(t *testing.T) string {
	t.Helper()
	name := strings.ToLower(strings.ReplaceAll(t.Name(), "/", "-"))
	if len(name) > 50 {
		name = name[:50]
	}
	ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name}}
	if err := apiClient.Create(context.Background(), ns); err != nil {
		t.Fatal(err)
	}
	return name
}

func create(t *testing.T, o client.Object) {
	t.Helper()
	if err := apiClient.Create(context.Background(), o); err != nil {
		t.Fatalf("creating %T %s: %v", o, o.GetName(), err)
	}
}

func newService(ns, name string, port int32, proto corev1.Protocol) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{
			Name: "p", Port: port, Protocol: proto, TargetPort: intstr.FromInt32(8080),
		}}},
	}
}

func newSlice(svc *corev1.Service, name, node string, addrs ...string) *discoveryv1.EndpointSlice {
	sl := &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: svc.Namespace, Name: name,
			Labels:      map[string]string{discoveryv1.LabelServiceName: svc.Name},
			Annotations: map[string]string{"endpoints.kubernetes.io/last-change-trigger-time": time.Now().UTC().Format(time.RFC3339Nano)},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("p"), Port: ptr.To[int32](8080), Protocol: ptr.To(svc.Spec.Ports[0].Protocol)}},
	}
	for _, a := range addrs {
		sl.Endpoints = append(sl.Endpoints, discoveryv1.Endpoint{
			Addresses: []string{a}, NodeName: ptr.To(node),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
		})
	}
	return sl
}

// endpointsOf returns the endpoints the ruleset sends a Service's first
// port to, or an error when the Service is not programmed.
func endpointsOf(rs *dataplane.Ruleset, key types.NamespacedName) ([]string, error) {
	svc := rs.Services[key]
	if svc == nil {
		return nil, fmt.Errorf("service %s not programmed", key)
	}
	if len(svc.Ports) == 0 {
		return nil, fmt.Errorf("service %s has no ports programmed", key)
	}
	var out []string
	for _, ep := range svc.Ports[0].Endpoints {
		out = append(out, ep.String())
	}
	return out, nil
}

func wantEndpoints(key types.NamespacedName, want ...string) func(*dataplane.Ruleset) error {
	return func(rs *dataplane.Ruleset) error {
		got, err := endpointsOf(rs, key)
		if err != nil {
			return err
		}
		if !slices.Equal(got, want) {
			return fmt.Errorf("endpoints of %s = %v, want %v", key, got, want)
		}
		return nil
	}
}

// TestServicesFollowTheAPI: Services and EndpointSlices created, changed
// and deleted in the API server reach the ruleset.
func TestServicesFollowTheAPI(t *testing.T) {
	ns := createNamespace(t)
	ta := startAgent(t)
	ctx := context.Background()

	svc := newService(ns, "web", 80, corev1.ProtocolTCP)
	create(t, svc)
	key := types.NamespacedName{Namespace: ns, Name: "web"}
	ta.lastWith(t, "Service without endpoints", func(rs *dataplane.Ruleset) error {
		eps, err := endpointsOf(rs, key)
		if err == nil && len(eps) != 0 {
			return fmt.Errorf("endpoints %v, want none", eps)
		}
		return err
	})
	if !ta.Syncer.Status().Synced {
		t.Error("status not synced after a write")
	}

	create(t, newSlice(svc, "web-a", ta.node, "10.1.0.11", "10.1.0.12"))
	ta.lastWith(t, "endpoints from one slice", wantEndpoints(key, "10.1.0.11:8080", "10.1.0.12:8080"))

	create(t, newSlice(svc, "web-b", "other", "10.1.0.13"))
	ta.lastWith(t, "endpoints from two slices", wantEndpoints(key, "10.1.0.11:8080", "10.1.0.12:8080", "10.1.0.13:8080"))

	var sl discoveryv1.EndpointSlice
	if err := apiClient.Get(ctx, types.NamespacedName{Namespace: ns, Name: "web-a"}, &sl); err != nil {
		t.Fatal(err)
	}
	sl.Endpoints[0].Conditions.Ready = ptr.To(false)
	if err := apiClient.Update(ctx, &sl); err != nil {
		t.Fatal(err)
	}
	ta.lastWith(t, "an endpoint no longer ready", wantEndpoints(key, "10.1.0.12:8080", "10.1.0.13:8080"))

	if err := apiClient.Delete(ctx, &sl); err != nil {
		t.Fatal(err)
	}
	ta.lastWith(t, "a slice deleted", wantEndpoints(key, "10.1.0.13:8080"))

	if err := apiClient.Delete(ctx, svc); err != nil {
		t.Fatal(err)
	}
	ta.lastWith(t, "the Service deleted", func(rs *dataplane.Ruleset) error {
		if rs.Services[key] != nil {
			return errors.New("still programmed")
		}
		return nil
	})
}

// TestNodeAndConfigFollowTheAPI: the Node's addresses become NodePort
// addresses and ProxyConfig edits take effect live.
func TestNodeAndConfigFollowTheAPI(t *testing.T) {
	ns := createNamespace(t)
	ta := startAgent(t)
	ctx := context.Background()

	svc := newService(ns, "np", 80, corev1.ProtocolTCP)
	svc.Spec.Type = corev1.ServiceTypeNodePort
	create(t, svc)
	create(t, newSlice(svc, "np-a", ta.node, "10.1.0.21"))

	node := &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: ta.node, Labels: map[string]string{corev1.LabelTopologyZone: "zone-a"}}}
	create(t, node)
	node.Status.Addresses = []corev1.NodeAddress{{Type: corev1.NodeInternalIP, Address: "192.168.7.1"}, {Type: corev1.NodeHostName, Address: "ignored"}}
	if err := apiClient.Status().Update(ctx, node); err != nil {
		t.Fatal(err)
	}
	ta.lastWith(t, "the Node's address in the NodePort addresses", func(rs *dataplane.Ruleset) error {
		if !strings.Contains(rs.String(), "192.168.7.1") {
			return errors.New("192.168.7.1 not in the ruleset")
		}
		return nil
	})

	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: ta.config}}
	create(t, pc)
	writesBefore, _, _ := ta.applier.stats()
	pc.Spec.MasqueradeAll = true
	if err := apiClient.Update(ctx, pc); err != nil {
		t.Fatal(err)
	}
	ta.lastWith(t, "masqueradeAll on", func(rs *dataplane.Ruleset) error {
		if !strings.Contains(rs.String(), "masqueradeAll") {
			return errors.New("no masqueradeAll rule")
		}
		return nil
	})
	if w, _, _ := ta.applier.stats(); w <= writesBefore {
		t.Errorf("no write after the ProxyConfig changed")
	}
	if got := ta.Syncer.Status().ConfigGeneration; got != 2 {
		t.Errorf("applied ProxyConfig generation %d, want 2", got)
	}
	if err := apiClient.Delete(ctx, pc); err != nil {
		t.Fatal(err)
	}
	ta.lastWith(t, "defaults again after the ProxyConfig is deleted", func(rs *dataplane.Ruleset) error {
		if strings.Contains(rs.String(), "masqueradeAll") {
			return errors.New("masqueradeAll rule still there")
		}
		return nil
	})
}

// TestBurstsCoalesce: with minSyncInterval 2s, a burst of 30 Services
// lands in a few writes, not 30.
func TestBurstsCoalesce(t *testing.T) {
	ns := createNamespace(t)
	ctx := context.Background()
	ta := startAgent(t)
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: ta.config},
		Spec: proxyv1alpha1.ProxyConfigSpec{MinSyncInterval: &metav1.Duration{Duration: 2 * time.Second}}}
	create(t, pc)
	ta.lastWith(t, "first sync", func(*dataplane.Ruleset) error { return nil })
	waitFor(t, 10*time.Second, "config applied", func() error {
		if ta.Syncer.Status().ConfigGeneration != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	before, _, _ := ta.applier.stats()
	for i := range 30 {
		create(t, newService(ns, fmt.Sprintf("s%02d", i), 80, corev1.ProtocolTCP))
	}
	ta.lastWith(t, "all 30 Services", func(rs *dataplane.Ruleset) error {
		n := 0
		for key := range rs.Services {
			if key.Namespace == ns {
				n++
			}
		}
		if n != 30 {
			return fmt.Errorf("%d of 30 programmed", n)
		}
		return nil
	})
	after, _, _ := ta.applier.stats()
	if writes := after - before; writes > 3 {
		t.Errorf("30 Services created within 2s took %d writes, want at most 3", writes)
	}
	_ = ctx
}

// TestFailedWritesRetryWithFullResync: a failing applier is retried with
// backoff, the retry rewrites the whole table, and a stale agent fails
// /healthz until a write succeeds.
func TestFailedWritesRetryWithFullResync(t *testing.T) {
	ns := createNamespace(t)
	probes := freeLoopbackAddress(t)
	ta := startAgent(t, func(o *Options) { o.HealthProbeAddress = probes })
	probe := func(path string) (int, string) {
		t.Helper()
		resp, err := http.Get("http://" + probes + path + "?verbose")
		if err != nil {
			return 0, err.Error()
		}
		defer func() { _ = resp.Body.Close() }()
		body, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body)
	}
	pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: ta.config},
		Spec: proxyv1alpha1.ProxyConfigSpec{
			SyncInterval:    &metav1.Duration{Duration: time.Second},
			MinSyncInterval: &metav1.Duration{Duration: 0},
		}}
	create(t, pc)
	waitFor(t, 10*time.Second, "config applied", func() error {
		if ta.Syncer.Status().ConfigGeneration != 1 {
			return errors.New("not yet")
		}
		return nil
	})
	waitFor(t, 10*time.Second, "/readyz and /healthz passing", func() error {
		for _, path := range []string{"/readyz", "/healthz"} {
			if code, body := probe(path); code != http.StatusOK {
				return fmt.Errorf("%s: %d %s", path, code, body)
			}
		}
		return nil
	})
	_, replacesBefore, _ := ta.applier.stats()

	ta.applier.failNext(-1, errors.New("injected failure"))
	svc := newService(ns, "web", 80, corev1.ProtocolTCP)
	create(t, svc)
	key := types.NamespacedName{Namespace: ns, Name: "web"}
	waitFor(t, 10*time.Second, "/healthz failing while writes fail", func() error {
		if err := ta.Syncer.Healthy(time.Now()); err == nil {
			return errors.New("still healthy")
		}
		return nil
	})
	if err := ta.Syncer.Healthy(time.Now()); !strings.Contains(err.Error(), "injected failure") {
		t.Errorf("health error %q does not name the last failure", err)
	}
	if code, body := probe("/healthz"); code != http.StatusInternalServerError || !strings.Contains(body, "rules-fresh") {
		t.Errorf("/healthz with stale rules: %d %s", code, body)
	}

	ta.applier.failNext(0, nil)
	ta.lastWith(t, "the Service after writes work again", func(rs *dataplane.Ruleset) error {
		if rs.Services[key] == nil {
			return errors.New("not programmed")
		}
		return nil
	})
	if _, replaces, _ := ta.applier.stats(); replaces <= replacesBefore {
		t.Errorf("no full rewrite after the failures")
	}
	if err := ta.Syncer.Healthy(time.Now()); err != nil {
		t.Errorf("unhealthy after a successful write: %v", err)
	}
	if code, body := probe("/healthz"); code != http.StatusOK {
		t.Errorf("/healthz after a successful write: %d %s", code, body)
	}
}

// TestProblemEvents: a Service with an invalid field gets one Warning
// Event naming it, not one per sync; its valid parts are programmed.
func TestProblemEvents(t *testing.T) {
	ns := createNamespace(t)
	ta := startAgent(t)
	ctx := context.Background()
	svc := newService(ns, "lb", 80, corev1.ProtocolTCP)
	svc.Spec.ExternalIPs = []string{"203.0.113.7"}
	create(t, svc)
	create(t, newSlice(svc, "lb-a", ta.node, "10.1.0.31"))
	svc.Spec.Type = corev1.ServiceTypeLoadBalancer
	if err := apiClient.Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	// A wrong-family LoadBalancer IP, as a cloud controller might write.
	svc.Status.LoadBalancer.Ingress = []corev1.LoadBalancerIngress{{IP: "2001:db8::7"}}
	if err := apiClient.Status().Update(ctx, svc); err != nil {
		t.Fatal(err)
	}
	key := types.NamespacedName{Namespace: ns, Name: "lb"}
	ta.lastWith(t, "the valid parts programmed", func(rs *dataplane.Ruleset) error {
		s := rs.Services[key]
		if s == nil || len(s.Ports) == 0 || !slices.Contains(s.Ports[0].Frontends, netip.MustParseAddrPort("203.0.113.7:80")) {
			return errors.New("externalIP not programmed")
		}
		if len(s.Problems) == 0 {
			return errors.New("no problem reported")
		}
		return nil
	})
	var events eventsv1.EventList
	waitFor(t, 10*time.Second, "a Warning Event on the Service", func() error {
		if err := apiClient.List(ctx, &events, client.InNamespace(ns)); err != nil {
			return err
		}
		if len(events.Items) == 0 {
			return errors.New("no Event")
		}
		return nil
	})
	ev := events.Items[0]
	if ev.Regarding.Name != "lb" || ev.Type != corev1.EventTypeWarning || ev.Reason != "LoadBalancerIPNotProgrammed" ||
		!strings.Contains(ev.Note, "status.loadBalancer.ingress[0].ip") {
		t.Errorf("event = %s %s on %s: %q", ev.Type, ev.Reason, ev.Regarding.Name, ev.Note)
	}

	// More syncs for other reasons do not repeat it.
	create(t, newSlice(svc, "lb-b", ta.node, "10.1.0.32"))
	ta.lastWith(t, "second endpoint", wantEndpoints(key, "10.1.0.31:8080", "10.1.0.32:8080"))
	time.Sleep(time.Second)
	if err := apiClient.List(ctx, &events, client.InNamespace(ns)); err != nil {
		t.Fatal(err)
	}
	if len(events.Items) != 1 || events.Items[0].DeprecatedCount > 1 {
		t.Errorf("%d Events after more syncs, want the one", len(events.Items))
	}
}
