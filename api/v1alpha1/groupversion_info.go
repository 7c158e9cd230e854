// Package v1alpha1 holds the ProxyConfig API: the knobs of nftproxy's node
// agents, one cluster-scoped object per group of nodes.
//
// +kubebuilder:object:generate=true
// +groupName=proxy.nftproxy.io
package v1alpha1

import (
	"k8s.io/apimachinery/pkg/runtime/schema"
	"sigs.k8s.io/controller-runtime/pkg/scheme"
)

var (
	// GroupVersion is the API group and version of ProxyConfig.
	GroupVersion = schema.GroupVersion{Group: "proxy.nftproxy.io", Version: "v1alpha1"}

	// SchemeBuilder registers this package's types with a runtime.Scheme.
	SchemeBuilder = &scheme.Builder{GroupVersion: GroupVersion}

	// AddToScheme adds this package's types to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)
