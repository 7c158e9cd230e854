// Package dataplane turns a snapshot of Services, EndpointSlices, this node
// and its ProxyConfig into one nftables table, and writes it to the kernel
// over netlink with the smallest diff. The controllers feed it; nothing
// else in nftproxy touches the kernel.
package dataplane
