# nftproxy: a Kubernetes service proxy on nftables maps.
# `make help` lists the targets.

# Tools are pinned here and installed into bin/ on first use.
CONTROLLER_TOOLS_VERSION ?= v0.23.0
GOLANGCI_LINT_VERSION ?= v2.15.0

LOCALBIN ?= $(CURDIR)/bin
CONTROLLER_GEN ?= $(LOCALBIN)/controller-gen-$(CONTROLLER_TOOLS_VERSION)
GOLANGCI_LINT ?= $(LOCALBIN)/golangci-lint-$(GOLANGCI_LINT_VERSION)

IMG ?= ghcr.io/nftproxy/nftproxy:latest
VERSION ?= $(shell git describe --tags --always --dirty 2>/dev/null || echo dev)
LDFLAGS := -X github.com/nftproxy/nftproxy/internal/version.Version=$(VERSION)

# Extra arguments for `go test`, for example GOTEST_FLAGS='-run TestAgentBinary -v'.
# Results are never cached: some tests build and run the agent binary.
GOTEST_FLAGS ?=

SHELL := /usr/bin/env bash -o pipefail
.SHELLFLAGS := -ec
.DEFAULT_GOAL := help

##@ General

.PHONY: help
help: ## Show this help.
	@awk 'BEGIN {FS = ":.*##"; printf "Usage: make \033[36m<target>\033[0m\n"} \
		/^[a-zA-Z_0-9-]+:.*?##/ { printf "  \033[36m%-12s\033[0m %s\n", $$1, $$2 } \
		/^##@/ { printf "\n\033[1m%s\033[0m\n", substr($$0, 5) }' $(MAKEFILE_LIST)

##@ Development

.PHONY: manifests
manifests: $(CONTROLLER_GEN) ## Generate the CRD and RBAC manifests from the Go markers.
	$(CONTROLLER_GEN) rbac:roleName=nftproxy crd paths="./..." \
		output:crd:artifacts:config=config/crd/bases output:rbac:artifacts:config=config/rbac

.PHONY: generate
generate: $(CONTROLLER_GEN) ## Generate the DeepCopy methods of the API types.
	$(CONTROLLER_GEN) object:headerFile="hack/boilerplate.go.txt" paths="./..."

.PHONY: fmt
fmt: ## Run gofmt on the code.
	gofmt -s -w $$(git ls-files '*.go')

.PHONY: vet
vet: ## Run go vet.
	go vet ./...

.PHONY: lint
lint: $(GOLANGCI_LINT) ## Run golangci-lint.
	$(GOLANGCI_LINT) run ./...

.PHONY: verify
verify: generate manifests ## Fail if generated code, manifests, go.mod or formatting are not up to date.
	@go mod tidy -diff || { echo "go.mod/go.sum are not tidy: run go mod tidy"; exit 1; }
	@test -z "$$(gofmt -s -l $$(git ls-files '*.go'))" || { gofmt -s -l $$(git ls-files '*.go'); echo "gofmt: run make fmt"; exit 1; }
	@git diff --exit-code -- api config || { echo "generated files are stale: run make generate manifests and commit"; exit 1; }
	@test -z "$$(git status --porcelain -- api config)" || { git status --porcelain -- api config; echo "untracked generated files: commit them"; exit 1; }

.PHONY: envtest-assets
envtest-assets: ## Build kube-apiserver and etcd for envtest into bin/k8s (no internet needed).
	@hack/envtest-assets.sh

.PHONY: test
test: vet ## Run every test this machine can run (unit, envtest; kernel tests need root).
	KUBEBUILDER_ASSETS="$$(hack/envtest-assets.sh)" go test -count=1 $(GOTEST_FLAGS) ./...

.PHONY: test-e2e
test-e2e: ## Only the end-to-end tests: the real agent on a cluster of network namespaces (root; part of `make test` too).
	KUBEBUILDER_ASSETS="$$(hack/envtest-assets.sh)" go test -count=1 -v $(GOTEST_FLAGS) ./test/e2e/...

.PHONY: test-kind
test-kind: ## The scenarios against a real kind cluster without kube-proxy (needs Docker, kind, kubectl; skips without them).
	GOTEST_FLAGS="$(GOTEST_FLAGS)" test/kind/run.sh

.PHONY: bench
bench: ## The real agent against a real API server at 1k/10k/50k Services, ~10 min (BENCH_SCALES=1000,10000 for less): report in bin/bench (root).
	KUBEBUILDER_ASSETS="$$(hack/envtest-assets.sh)" go run ./test/bench -out $(LOCALBIN)/bench $(BENCH_FLAGS)

.PHONY: bench-dataplane
bench-dataplane: ## Dataplane micro-benchmarks: compute, cold start into an empty kernel, one change, at 1k/10k/50k Services (kernel parts need root).
	go test -run XXX -bench . -benchtime $(BENCHTIME) -timeout 30m ./dataplane

# Iterations per benchmark; the 50k cold start alone takes seconds each.
BENCHTIME ?= 10x

##@ Build

.PHONY: build
build: ## Build the agent binary into bin/nftproxy.
	CGO_ENABLED=0 go build -ldflags "$(LDFLAGS)" -o $(LOCALBIN)/nftproxy ./cmd/nftproxy

.PHONY: run
run: build ## Run the agent against the cluster of $KUBECONFIG (ARGS='--node-name=...' adds flags).
	$(LOCALBIN)/nftproxy $(ARGS)

.PHONY: demo
demo: build ## Show it working: a cluster of network namespaces, Services, traffic, the rules; until Ctrl-C (DEMO_FLAGS=--once for one pass; root).
	go build -o $(LOCALBIN)/demo ./hack/demo
	KUBEBUILDER_ASSETS="$$(hack/envtest-assets.sh)" $(LOCALBIN)/demo --agent $(LOCALBIN)/nftproxy $(DEMO_FLAGS)

.PHONY: run-local
run-local: build ## Run the agent against a throwaway local API server until Ctrl-C (no cluster needed).
	KUBEBUILDER_ASSETS="$$(hack/envtest-assets.sh)" go run ./hack/run-local -- --health-probe-bind-address=127.0.0.1:10256 --zap-encoder=console $(ARGS)

.PHONY: docker-build
docker-build: ## Build the container image $(IMG) (needs Docker).
	docker build --build-arg VERSION=$(VERSION) -t $(IMG) .

##@ Deployment

.PHONY: deploy
deploy: ## Deploy to the cluster of $KUBECONFIG with kustomize.
	kubectl apply -k config/default

.PHONY: undeploy
undeploy: ## Remove the deployment (run `nftproxy cleanup` on nodes to remove their table).
	kubectl delete --ignore-not-found -k config/default

##@ Tools

$(LOCALBIN):
	mkdir -p $(LOCALBIN)

$(CONTROLLER_GEN): | $(LOCALBIN)
	$(call go-install-tool,$(CONTROLLER_GEN),sigs.k8s.io/controller-tools/cmd/controller-gen,$(CONTROLLER_TOOLS_VERSION))

$(GOLANGCI_LINT): | $(LOCALBIN)
	$(call go-install-tool,$(GOLANGCI_LINT),github.com/golangci/golangci-lint/v2/cmd/golangci-lint,$(GOLANGCI_LINT_VERSION))

# go-install-tool installs package $(2) at version $(3) as the file $(1).
define go-install-tool
@set -e; tmp=$$(mktemp -d); \
echo "installing $(2)@$(3)"; \
GOBIN=$$tmp go install $(2)@$(3); \
mv $$tmp/$$(basename $(2)) $(1); rm -rf $$tmp
endef
