# The nftproxy agent: a static binary on a minimal base image. It runs as
# root with only NET_ADMIN (see config/manager/daemonset.yaml): Kubernetes
# gives no ambient capabilities to non-root processes.
# The Go release of go.mod's go line (test/kind checks that they match).
FROM golang:1.26.8 AS build
WORKDIR /src
COPY go.mod go.sum ./
RUN go mod download
COPY . .
ARG VERSION=dev
RUN CGO_ENABLED=0 go build -trimpath \
    -ldflags "-s -w -X github.com/nftproxy/nftproxy/internal/version.Version=${VERSION}" \
    -o /out/nftproxy ./cmd/nftproxy

FROM gcr.io/distroless/static-debian12
COPY --from=build /out/nftproxy /nftproxy
ENTRYPOINT ["/nftproxy"]
