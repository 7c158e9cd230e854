package agent

import (
	"context"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/nftproxy/nftproxy/dataplane"
)

// Metrics are the agent's Prometheus metrics. Where kube-proxy has a
// metric with the same meaning, ours has its name with the nftproxy_
// prefix instead of kubeproxy_, so dashboards translate by renaming.
type Metrics struct {
	syncDuration        prometheus.Histogram
	fullSyncDuration    prometheus.Histogram
	partialSyncDuration prometheus.Histogram
	lastSync            prometheus.Gauge
	programming         prometheus.Histogram
	failures            prometheus.Counter
	pending             prometheus.GaugeFunc
	services            prometheus.Gauge
	endpoints           prometheus.Gauge
	objects             *prometheus.GaugeVec
	batchBytes          prometheus.Gauge
	batchMessages       prometheus.Gauge
	conntrackDeleted    prometheus.Counter
	conntrackFailures   prometheus.Counter

	collectors []prometheus.Collector

	// counts per Service, so each sync recounts only what changed.
	counts map[any]serviceCounts
	totals serviceCounts
}

type serviceCounts struct {
	ports, endpoints, chains, rules, elements int
}

// NewMetrics creates the metrics and registers them with reg. pending
// reports the number of Services with changes not yet written.
func NewMetrics(reg prometheus.Registerer, pending func() float64) *Metrics {
	durations := prometheus.ExponentialBuckets(0.001, 2, 15) // 1 ms .. 16 s
	m := &Metrics{
		syncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "nftproxy_sync_proxy_rules_duration_seconds", Buckets: durations,
			Help: "Time to compute and write one sync of the node's rules, full or partial.",
		}),
		fullSyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "nftproxy_sync_full_proxy_rules_duration_seconds", Buckets: durations,
			Help: "Time of syncs that rewrote the whole table.",
		}),
		partialSyncDuration: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: "nftproxy_sync_partial_proxy_rules_duration_seconds", Buckets: durations,
			Help: "Time of syncs that wrote only what changed.",
		}),
		lastSync: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftproxy_sync_proxy_rules_last_timestamp_seconds",
			Help: "Unix time of the last successful sync.",
		}),
		programming: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "nftproxy_network_programming_duration_seconds",
			Buckets: prometheus.ExponentialBuckets(0.005, 2, 14), // 5 ms .. 41 s
			Help:    "Time from an EndpointSlice change (its endpoints.kubernetes.io/last-change-trigger-time) to the rules for it being written on this node.",
		}),
		failures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftproxy_sync_proxy_rules_nftables_sync_failures_total",
			Help: "Syncs whose write to the kernel failed.",
		}),
		pending: prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "nftproxy_sync_proxy_rules_service_changes_pending",
			Help: "Services (with their EndpointSlices), the Node or the ProxyConfig changed and not yet written.",
		}, pending),
		services: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftproxy_services_programmed",
			Help: "Service ports programmed, per family (a dual-stack port counts twice).",
		}),
		endpoints: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftproxy_endpoints_programmed",
			Help: "Endpoints programmed, summed over Service ports and families.",
		}),
		objects: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "nftproxy_nftables_objects",
			Help: "Objects in nftproxy's nftables table, by kind (chains, rules, elements).",
		}, []string{"kind"}),
		batchBytes: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftproxy_sync_netlink_bytes",
			Help: "Bytes of netlink messages in the last write.",
		}),
		batchMessages: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "nftproxy_sync_netlink_messages",
			Help: "Netlink messages in the last write.",
		}),
		conntrackDeleted: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftproxy_conntrack_cleanup_entries_deleted_total",
			Help: "Stale UDP conntrack entries deleted after writes.",
		}),
		conntrackFailures: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "nftproxy_conntrack_cleanup_failures_total",
			Help: "UDP conntrack cleanups that failed, in whole or in part.",
		}),
		counts: map[any]serviceCounts{},
	}
	m.collectors = []prometheus.Collector{m.syncDuration, m.fullSyncDuration, m.partialSyncDuration, m.lastSync, m.programming,
		m.failures, m.pending, m.services, m.endpoints, m.objects, m.batchBytes, m.batchMessages,
		m.conntrackDeleted, m.conntrackFailures}
	reg.MustRegister(m.collectors...)
	return m
}

// unregister removes the metrics from reg, so that another agent in the
// same process (a test's) can register its own.
func (m *Metrics) unregister(reg prometheus.Registerer) {
	for _, c := range m.collectors {
		reg.Unregister(c)
	}
}

func (m *Metrics) observeSync(full, _ bool, d time.Duration, err error) {
	if m == nil {
		return
	}
	if err != nil {
		m.failures.Inc()
		return
	}
	m.syncDuration.Observe(d.Seconds())
	if full {
		m.fullSyncDuration.Observe(d.Seconds())
	} else {
		m.partialSyncDuration.Observe(d.Seconds())
	}
}

func (m *Metrics) observeApplied(_ *dataplane.Ruleset, triggers []time.Time, now time.Time) {
	if m == nil {
		return
	}
	m.lastSync.Set(float64(now.UnixNano()) / 1e9)
	for _, t := range triggers {
		m.programming.Observe(now.Sub(t).Seconds())
	}
}

// countObjects is an AfterSync hook that keeps the object gauges current,
// recounting only the Services that changed.
func (m *Metrics) countObjects(_ context.Context, r SyncResult) {
	if m == nil {
		return
	}
	recount := func(svc *dataplane.ServiceRules, sign int) {
		c := countService(svc)
		m.totals.ports += sign * c.ports
		m.totals.endpoints += sign * c.endpoints
		m.totals.chains += sign * c.chains
		m.totals.rules += sign * c.rules
		m.totals.elements += sign * c.elements
	}
	if r.All || r.Previous == nil {
		m.totals = serviceCounts{}
		for _, svc := range r.Ruleset.Services {
			recount(svc, 1)
		}
	} else {
		for _, key := range r.Changed {
			if old := r.Previous.Services[key]; old != nil {
				recount(old, -1)
			}
			if svc := r.Ruleset.Services[key]; svc != nil {
				recount(svc, 1)
			}
		}
	}
	base := countBase(r.Ruleset.Base)
	m.services.Set(float64(m.totals.ports))
	m.endpoints.Set(float64(m.totals.endpoints))
	m.objects.WithLabelValues("chains").Set(float64(m.totals.chains + base.chains))
	m.objects.WithLabelValues("rules").Set(float64(m.totals.rules + base.rules))
	m.objects.WithLabelValues("elements").Set(float64(m.totals.elements + base.elements))
}

// observeBatch records the size of the last write when the applier can
// tell it.
func (m *Metrics) observeBatch(stats dataplane.BatchStats) {
	if m == nil {
		return
	}
	m.batchBytes.Set(float64(stats.Bytes))
	m.batchMessages.Set(float64(stats.Messages))
}

func countService(svc *dataplane.ServiceRules) serviceCounts {
	c := serviceCounts{ports: len(svc.Ports), chains: len(svc.Chains), elements: len(svc.Elements)}
	for _, p := range svc.Ports {
		c.endpoints += len(p.Endpoints)
	}
	for _, ch := range svc.Chains {
		c.rules += len(ch.Rules)
	}
	return c
}

func countBase(b *dataplane.Base) serviceCounts {
	c := serviceCounts{chains: len(b.Chains)}
	for _, ch := range b.Chains {
		c.rules += len(ch.Rules)
	}
	for _, s := range b.Sets {
		c.elements += len(s.Elements)
	}
	return c
}

func (m *Metrics) observeConntrack(deleted int, err error) {
	if m == nil {
		return
	}
	m.conntrackDeleted.Add(float64(deleted))
	if err != nil {
		m.conntrackFailures.Inc()
	}
}
