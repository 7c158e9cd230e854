package agent

import (
	"context"
	"maps"

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
	// wanted is the last set handed to the server; a failed port is
	// retried on every sync until it opens.
	wanted  map[types.NamespacedName]healthcheck.Service
	failing bool
}

func (h *healthChecks) afterSync(_ context.Context, r SyncResult) {
	wanted := map[types.NamespacedName]healthcheck.Service{}
	for key, rules := range r.Ruleset.Services {
		if rules.HealthCheckNodePort != 0 {
			wanted[key] = healthcheck.Service{Port: int32(rules.HealthCheckNodePort), LocalEndpoints: rules.LocalEndpoints()}
		}
	}
	if !h.failing && maps.Equal(wanted, h.wanted) {
		return
	}
	h.wanted = wanted
	err := h.server.Sync(wanted)
	h.failing = err != nil
	if err != nil {
		h.log.Error(err, "Some healthCheckNodePorts could not be served; retrying on the next sync")
	}
}
