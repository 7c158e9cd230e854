//go:build tools

// Package tools pins kube-apiserver for envtest; nothing imports it.
package tools

import _ "k8s.io/kubernetes/cmd/kube-apiserver"
