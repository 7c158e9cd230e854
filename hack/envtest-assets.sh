#!/usr/bin/env bash
# Prints a directory holding the kube-apiserver and etcd binaries that
# envtest runs, building them from their Go modules (pinned in
# hack/tools/kube-apiserver and hack/tools/etcd) when the cache lacks them.
# setup-envtest downloads from the internet; the Go module proxy is all some
# machines reach. A KUBEBUILDER_ASSETS already set wins.
set -euo pipefail

if [[ -n "${KUBEBUILDER_ASSETS:-}" ]]; then
	echo "$KUBEBUILDER_ASSETS"
	exit 0
fi

root=$(cd "$(dirname "$0")/.." && pwd)
tools=$root/hack/tools
k8s_version=$(awk '$1 == "k8s.io/kubernetes" { print $2; exit } $1 == "require" && $2 == "k8s.io/kubernetes" { print $3; exit }' "$tools/kube-apiserver/go.mod")
etcd_version=$(awk '$1 == "go.etcd.io/etcd/server/v3" { print $2; exit } $1 == "require" && $2 == "go.etcd.io/etcd/server/v3" { print $3; exit }' "$tools/etcd/go.mod")
if [[ -z "$k8s_version" || -z "$etcd_version" ]]; then
	echo "envtest-assets: cannot read the pinned versions from $tools" >&2
	exit 1
fi
assets=$root/bin/k8s/$k8s_version-etcd-$etcd_version

build() { # build <binary> <tools module> <package>
	if [[ -x "$assets/$1" ]]; then
		return
	fi
	echo "envtest-assets: building $1 from $3 (a few minutes on a cold module cache)" >&2
	mkdir -p "$assets"
	# Build beside the cache and rename, so a concurrent or interrupted run
	# never leaves a half-written binary under the final name.
	local tmp
	tmp=$(mktemp "$assets/.$1.XXXXXX")
	if ! (cd "$tools/$2" && CGO_ENABLED=0 go build -trimpath -o "$tmp" "$3") >&2; then
		rm -f "$tmp"
		return 1
	fi
	mv "$tmp" "$assets/$1"
}

build kube-apiserver kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver
build etcd etcd go.etcd.io/etcd/server/v3
echo "$assets"
