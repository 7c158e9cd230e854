// Package v1alpha1 holds the ProxyConfig API: the knobs of nftproxy's node
// agents, one cluster-scoped object per group of nodes.
//
// +kubebuilder:object:generate=true
// +groupName=proxy.nftproxy.io
package v1alpha1

import (
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
)

var (
	// GroupVersion is the API group and version of ProxyConfig.
	GroupVersion = schema.GroupVersion{Group: "proxy.nftproxy.io", Version: "v1alpha1"}

	// SchemeBuilder registers this package's types with a runtime.Scheme.
	SchemeBuilder = runtime.NewSchemeBuilder(addKnownTypes)

	// AddToScheme adds this package's types to a runtime.Scheme.
	AddToScheme = SchemeBuilder.AddToScheme
)

func addKnownTypes(s *runtime.Scheme) error {
	s.AddKnownTypes(GroupVersion, &ProxyConfig{}, &ProxyConfigList{})
	metav1.AddToGroupVersion(s, GroupVersion)
	return nil
}
