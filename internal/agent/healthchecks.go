package agent

import (
	"context"
	"maps"
	"slices"

	"github.com/go-logr/logr"
	"k8s.io/apimachinery/pkg/types"

	"github.com/nftproxy/nftproxy/internal/healthcheck"
)

// healthChecks keeps the healthCheckNodePort servers in step with the
// rules written: one per LoadBalancer Service with externalTrafficPolicy
// Local, answering with this node's count of local endpoints.
type healthChecks struct {
	server *healthcheck.Server
	log    logr.Logger
	// wanted is the set handed to the server, kept up to date from each
	// write's changed Services; a failed port is retried on every sync
	// until it opens.
	wanted  map[types.NamespacedName]healthcheck.Service
	failing bool
}

func (h *healthChecks) afterSync(_ context.Context, r SyncResult) {
	// Only the Services the write changed are looked at, unless it
	// rewrote everything: a sync must not cost O(Services) here.
	keys, full := r.Changed, false
	if r.All || h.wanted == nil {
		keys = slices.Collect(maps.Keys(r.Ruleset.Services))
		h.wanted = map[types.NamespacedName]healthcheck.Service{}
		full = true
	}
	changed := false
	for _, key := range keys {
		old, had := h.wanted[key]
		rules := r.Ruleset.Services[key]
		if rules == nil || rules.HealthCheckNodePort == 0 {
			if had {
				delete(h.wanted, key)
				changed = true
			}
			continue
		}
		cur := healthcheck.Service{Port: int32(rules.HealthCheckNodePort), LocalEndpoints: rules.LocalEndpoints()}
		if !had || old != cur {
			h.wanted[key] = cur
			changed = true
		}
	}
	if !changed && !full && !h.failing {
		return
	}
	err := h.server.Sync(maps.Clone(h.wanted))
	h.failing = err != nil
	if err != nil {
		h.log.Error(err, "Some healthCheckNodePorts could not be served; retrying on the next sync")
	}
}
