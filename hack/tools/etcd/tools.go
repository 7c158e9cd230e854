//go:build tools

// Package tools pins the etcd server for envtest; nothing imports it.
package tools

import _ "go.etcd.io/etcd/server/v3"
