// Package agent assembles the node agent: a controller-runtime manager
// whose reconcilers feed a Syncer that keeps this node's nftables table in
// step with the cluster, with health probes, metrics and Events.
package agent

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/rest"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/cache"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/config"
	ctrlmetrics "sigs.k8s.io/controller-runtime/pkg/metrics"
	"sigs.k8s.io/controller-runtime/pkg/metrics/filters"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/controllers"
	"github.com/nftproxy/nftproxy/dataplane"
	"github.com/nftproxy/nftproxy/internal/conntrack"
	"github.com/nftproxy/nftproxy/internal/healthcheck"
)

// Options configure an agent. Everything a cluster admin tunes while the
// agent runs lives in the ProxyConfig instead.
type Options struct {
	RESTConfig *rest.Config
	Scheme     *runtime.Scheme
	NodeName   string
	ConfigName string
	// MetricsAddress serves /metrics; "0" turns it off. MetricsSecure
	// serves it over HTTPS, allowing only clients the API server
	// authenticates and authorizes for GET /metrics.
	MetricsAddress string
	MetricsSecure  bool
	// HealthProbeAddress serves /healthz and /readyz; "0" turns it off.
	HealthProbeAddress string
	// PprofAddress serves Go's /debug/pprof; "" or "0" turns it off.
	PprofAddress string
	// LeaderElection elects the one agent (per ProxyConfig) that writes
	// status and Service Events, in LeaderElectionNamespace.
	LeaderElection          bool
	LeaderElectionNamespace string
	// StatusNamespace holds the agents' node reports (Leases), from which
	// the elected agent writes the ProxyConfig's status; "" turns both off.
	StatusNamespace string
	// StatusPeriod is how often the elected agent sums the reports up
	// (30s when 0).
	StatusPeriod time.Duration
	// NetNS, when set, is the path of the network namespace to program
	// instead of the agent's own (tests and demos run agents this way).
	NetNS string
	// Applier overrides the kernel applier (tests).
	Applier dataplane.Applier
	// ConntrackDeleter overrides the kernel's conntrack (tests).
	ConntrackDeleter FlowDeleter
	// Registry takes the agent's metrics; controller-runtime's, which the
	// metrics endpoint serves, when nil.
	Registry prometheus.Registerer
}

var skipNameValidation = true

// Agent is a configured node agent; Start runs it.
type Agent struct {
	Manager ctrl.Manager
	Syncer  *Syncer
	State   *controllers.State
	Metrics *Metrics
	closers []func() error
}

// New builds an agent's manager, reconcilers and syncer.
func New(ctx context.Context, opts Options) (*Agent, error) {
	if opts.NodeName == "" || opts.ConfigName == "" {
		return nil, errors.New("agent needs a node name and a ProxyConfig name")
	}
	metricsOpts := metricsserver.Options{BindAddress: opts.MetricsAddress}
	if opts.MetricsSecure {
		metricsOpts.SecureServing = true
		metricsOpts.FilterProvider = filters.WithAuthenticationAndAuthorization
	}
	mgr, err := ctrl.NewManager(opts.RESTConfig, ctrl.Options{
		Scheme:                 opts.Scheme,
		Metrics:                metricsOpts,
		HealthProbeBindAddress: opts.HealthProbeAddress,
		PprofBindAddress:       opts.PprofAddress,
		// No leader election of the manager's: it would end the agent
		// when the API server is away; leaderDuties elects instead.
		Cache: cacheOptions(opts),
		// Controller names label metrics and must be unique per process;
		// an agent has one manager, but tests run several agents.
		Controller: config.Controller{SkipNameValidation: &skipNameValidation},
	})
	if err != nil {
		return nil, fmt.Errorf("creating manager: %w", err)
	}

	a := &Agent{Manager: mgr, State: controllers.NewState()}
	if err := controllers.IndexEndpointSlices(ctx, mgr); err != nil {
		return nil, fmt.Errorf("indexing EndpointSlices: %w", err)
	}
	services := &controllers.ServiceReconciler{Reader: mgr.GetClient(), State: a.State}
	if err := services.SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("setting up the Service controller: %w", err)
	}
	if err := (&controllers.NodeReconciler{Reader: mgr.GetClient(), Name: opts.NodeName, State: a.State}).SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("setting up the Node controller: %w", err)
	}
	configs := &controllers.ConfigStore{}
	if err := (&controllers.ConfigReconciler{
		Reader: mgr.GetClient(), Name: opts.ConfigName, Store: configs, OnChange: a.State.SetConfig,
	}).SetupWithManager(mgr); err != nil {
		return nil, fmt.Errorf("setting up the ProxyConfig controller: %w", err)
	}

	applier := opts.Applier
	if applier == nil {
		var kopts []dataplane.KernelOption
		if opts.NetNS != "" {
			kopts = append(kopts, dataplane.WithNetNS(opts.NetNS))
		}
		k, err := dataplane.NewKernelApplier(kopts...)
		if err != nil {
			return nil, fmt.Errorf("opening nftables: %w", err)
		}
		a.closers = append(a.closers, k.Close)
		applier = k
	}

	registry := opts.Registry
	if registry == nil {
		registry = ctrlmetrics.Registry
	}
	a.Metrics = NewMetrics(registry, func() float64 {
		n, _ := a.State.Pending()
		return float64(n)
	})
	a.closers = append(a.closers, func() error { a.Metrics.unregister(registry); return nil })
	leader, err := newLeaderDuties(opts.RESTConfig, opts.LeaderElection, opts.LeaderElectionNamespace,
		"nftproxy-"+opts.ConfigName, opts.NodeName, ctrl.Log.WithName("leader"))
	if err != nil {
		return nil, err
	}
	if err := mgr.Add(leader); err != nil {
		return nil, err
	}
	reporter := newProblemReporter(mgr.GetEventRecorder("nftproxy"), leader.Leading)
	hooks := []func(context.Context, SyncResult){a.Metrics.countObjects, reporter.afterSync}

	healthOpts := []healthcheck.Option{
		healthcheck.WithLogger(ctrl.Log.WithName("healthcheck")),
		healthcheck.WithProxyHealthy(func() bool { return a.Syncer.Healthy(time.Now()) == nil }),
	}
	if opts.NetNS != "" {
		healthOpts = append(healthOpts, healthcheck.WithListenFunc(listenInNetNS(opts.NetNS)))
	}
	health, err := healthcheck.New(healthOpts...)
	if err != nil {
		return nil, err
	}
	a.closers = append(a.closers, health.Close)
	hooks = append(hooks, (&healthChecks{server: health, log: ctrl.Log.WithName("healthcheck")}).afterSync)

	deleter := opts.ConntrackDeleter
	if deleter == nil {
		var copts []conntrack.Option
		if opts.NetNS != "" {
			copts = append(copts, conntrack.WithNetNS(opts.NetNS))
		}
		cleaner, err := conntrack.New(copts...)
		if err != nil {
			return nil, fmt.Errorf("opening conntrack: %w", err)
		}
		a.closers = append(a.closers, cleaner.Close)
		deleter = cleaner
	}
	hooks = append(hooks, (&conntrackCleanup{deleter: deleter, log: ctrl.Log.WithName("conntrack"), metrics: a.Metrics}).afterSync)
	a.Syncer = &Syncer{
		State:    a.State,
		Applier:  applier,
		NodeName: opts.NodeName,
		Log:      ctrl.Log.WithName("syncer"),
		Metrics:  a.Metrics,
		WaitForCaches: func(ctx context.Context) error {
			if !mgr.GetCache().WaitForCacheSync(ctx) {
				return errors.New("caches did not sync")
			}
			return nil
		},
		Load: func(ctx context.Context) error {
			return controllers.LoadServices(ctx, mgr.GetClient(), a.State)
		},
		AfterSync: hooks,
	}
	if err := mgr.Add(a.Syncer); err != nil {
		return nil, err
	}

	if opts.StatusNamespace != "" {
		period := opts.StatusPeriod
		if period == 0 {
			period = statusPeriod
		}
		reporter := &nodeReporter{client: mgr.GetClient(), reader: mgr.GetAPIReader(), namespace: opts.StatusNamespace, node: opts.NodeName,
			config: opts.ConfigName, syncer: a.Syncer, log: ctrl.Log.WithName("report"), poll: min(reportPoll, period)}
		writer := &statusWriter{client: mgr.GetClient(), reader: mgr.GetAPIReader(), namespace: opts.StatusNamespace,
			config: opts.ConfigName, period: period, log: ctrl.Log.WithName("status")}
		if err := mgr.Add(reporter); err != nil {
			return nil, err
		}
		leader.add(writer.Start)
	}

	if err := mgr.AddHealthzCheck("rules-fresh", func(*http.Request) error { return a.Syncer.Healthy(time.Now()) }); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("proxyconfig", configs.ReadyCheck); err != nil {
		return nil, err
	}
	if err := mgr.AddReadyzCheck("first-sync", func(*http.Request) error { return a.Syncer.ReadyCheck() }); err != nil {
		return nil, err
	}
	return a, nil
}

// Start runs the agent until ctx ends. The node's rules stay in the
// kernel when it returns, so a restart does not cut traffic.
func (a *Agent) Start(ctx context.Context) error {
	defer func() {
		for _, c := range a.closers {
			_ = c()
		}
	}()
	return a.Manager.Start(ctx)
}

// cacheOptions keep the informer caches to what the proxy needs: only this
// node's Node and this agent's ProxyConfig, and of Services, slices and
// Nodes only the fields the dataplane reads, so a cluster of 50,000
// Services fits in little memory. Cached objects are shared, not copied,
// on reads: everything downstream treats them as immutable.
func cacheOptions(opts Options) cache.Options {
	noCopy := true
	return cache.Options{
		DefaultTransform: cache.TransformStripManagedFields(),
		ByObject: map[client.Object]cache.ByObject{
			&proxyv1alpha1.ProxyConfig{}: {Field: fields.OneTermEqualSelector("metadata.name", opts.ConfigName)},
			&corev1.Node{}: {
				Field:     fields.OneTermEqualSelector("metadata.name", opts.NodeName),
				Transform: stripNode,
			},
			&corev1.Service{}:            {Transform: stripService, UnsafeDisableDeepCopy: &noCopy},
			&discoveryv1.EndpointSlice{}: {Transform: stripEndpointSlice, UnsafeDisableDeepCopy: &noCopy},
		},
	}
}

// keptAnnotationPrefixes are the annotations the dataplane or the metrics
// may read; the rest (kubectl's last-applied-configuration above all) is
// dropped from the cache.
var keptAnnotationPrefixes = []string{"service.kubernetes.io/", "endpoints.kubernetes.io/"}

func stripAnnotations(a map[string]string) map[string]string {
	var out map[string]string
	for k, v := range a {
		for _, p := range keptAnnotationPrefixes {
			if strings.HasPrefix(k, p) {
				if out == nil {
					out = map[string]string{}
				}
				out[k] = v
			}
		}
	}
	return out
}

func stripService(o any) (any, error) {
	svc, ok := o.(*corev1.Service)
	if !ok {
		return o, nil
	}
	svc.ManagedFields = nil
	svc.Annotations = stripAnnotations(svc.Annotations)
	svc.OwnerReferences = nil
	svc.Spec.Selector = nil
	svc.Status.Conditions = nil
	return svc, nil
}

func stripEndpointSlice(o any) (any, error) {
	sl, ok := o.(*discoveryv1.EndpointSlice)
	if !ok {
		return o, nil
	}
	sl.ManagedFields = nil
	sl.Annotations = stripAnnotations(sl.Annotations)
	sl.OwnerReferences = nil
	for i := range sl.Endpoints {
		sl.Endpoints[i].TargetRef = nil
		sl.Endpoints[i].DeprecatedTopology = nil
	}
	return sl, nil
}

func stripNode(o any) (any, error) {
	n, ok := o.(*corev1.Node)
	if !ok {
		return o, nil
	}
	n.ManagedFields = nil
	n.Annotations = nil
	n.Status = corev1.NodeStatus{Addresses: n.Status.Addresses}
	n.Spec = corev1.NodeSpec{PodCIDR: n.Spec.PodCIDR, PodCIDRs: n.Spec.PodCIDRs}
	return n, nil
}
