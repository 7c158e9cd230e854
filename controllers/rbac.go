// Package controllers holds the agent's reconcilers: they read the cluster
// objects a node's proxy depends on and hand them on; they never write
// rules themselves.
package controllers

// The agent's permissions, all of them: `make manifests` turns these markers
// into config/rbac/role.yaml. Leases for leader election are granted in the
// agent's own namespace only (config/rbac/leader_election_role.yaml).
//
// +kubebuilder:rbac:groups="",resources=services;nodes,verbs=get;list;watch
// +kubebuilder:rbac:groups=discovery.k8s.io,resources=endpointslices,verbs=get;list;watch
// +kubebuilder:rbac:groups=proxy.nftproxy.io,resources=proxyconfigs,verbs=get;list;watch
// +kubebuilder:rbac:groups=proxy.nftproxy.io,resources=proxyconfigs/status,verbs=get;update;patch
// +kubebuilder:rbac:groups="";events.k8s.io,resources=events,verbs=create;patch
//
// With --metrics-secure, the metrics endpoint asks the API server who a
// scraper is and whether it may GET /metrics:
//
// +kubebuilder:rbac:groups=authentication.k8s.io,resources=tokenreviews,verbs=create
// +kubebuilder:rbac:groups=authorization.k8s.io,resources=subjectaccessreviews,verbs=create
