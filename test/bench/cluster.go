package main

import (
	"context"
	"encoding/json"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/utils/ptr"
	"sigs.k8s.io/controller-runtime/pkg/client"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"
	"github.com/nftproxy/nftproxy/test/testenv"
)

// The benchmark's cluster: a real kube-apiserver and etcd (envtest), with
// Services and EndpointSlices written as a cluster's controllers would.
// There is no endpointslice controller: the harness writes the slices.

const (
	nodeName       = "bench-node"
	namespaceCount = 10
	servicePort    = 80
	// serviceRange must hold 50,000 ClusterIPs and the change
	// benchmark's new ones; envtest's default is a /24.
	serviceRange = "10.96.0.0/16"
	// createWorkers writes objects concurrently: one request at a time
	// takes ~1 ms of round trip, and the API server has two cores.
	createWorkers = 128
	// endpointsPerService is the aim's 4; one more pod is kept spare for
	// the endpoint-added change.
	endpointsPerService = 4
)

// Service i has ClusterIP 10.96.1.0 + i (the API server itself takes
// 10.96.0.1), up to 10.96.196.80 at 50,000; the Services the change
// benchmark adds come from 10.96.240.0 on, so that they never collide
// with a released address.
var (
	serviceBase    = netip.MustParseAddr("10.96.1.0")
	newServiceBase = netip.MustParseAddr("10.96.240.0")
)

func addrAdd(base netip.Addr, n int) netip.Addr {
	b := base.As4()
	v := uint32(b[0])<<24 | uint32(b[1])<<16 | uint32(b[2])<<8 | uint32(b[3])
	v += uint32(n)
	return netip.AddrFrom4([4]byte{byte(v >> 24), byte(v >> 16), byte(v >> 8), byte(v)})
}

// serviceKey and serviceIP name Service i of the scale series.
func serviceKey(i int) types.NamespacedName {
	return types.NamespacedName{Namespace: fmt.Sprintf("bench-%d", i%namespaceCount), Name: fmt.Sprintf("svc-%d", i)}
}

func serviceIP(i int) netip.Addr { return addrAdd(serviceBase, i) }

// cluster is the running API server and clients for it.
type cluster struct {
	env        *envtest.Environment
	kubeconfig string
	clientset  kubernetes.Interface
	client     client.Client
	created    int // Services 0..created-1 exist, each with its slice
}

// startCluster starts kube-apiserver and etcd from $KUBEBUILDER_ASSETS,
// with a Service range large enough for the biggest scale, and writes an
// admin kubeconfig into dir. The caller stops it with stop.
func startCluster(ctx context.Context, dir string, minSyncInterval time.Duration) (c *cluster, err error) {
	if os.Getenv("KUBEBUILDER_ASSETS") == "" {
		return nil, fmt.Errorf("KUBEBUILDER_ASSETS is not set: run `make bench`, which builds kube-apiserver and etcd")
	}
	env := testenv.NewEnvironment()
	apiserver := env.ControlPlane.GetAPIServer().Configure()
	apiserver.Set("service-cluster-ip-range", serviceRange)
	// The bitmap ClusterIP allocator, not the IPAddress one (GA in 1.33):
	// kube-apiserver v1.33's IPAddress allocator lists every IPAddress
	// twice per Service create, to update a metric
	// (ipallocator.(*Allocator).createIPAddress calls Used and Free), so
	// creating N Services costs O(N²): here, going from 10,000 to
	// 27,000 Services took 11 minutes. The bitmap is one object for the whole range, which is
	// why the range is a /16 (an 8 KiB bitmap), not larger.
	apiserver.Append("feature-gates", "MultiCIDRServiceAllocator=false")
	if _, err := env.Start(); err != nil {
		return nil, fmt.Errorf("starting the API server: %w", err)
	}
	c = &cluster{env: env}
	defer func() {
		if err != nil {
			c.stop()
		}
	}()
	admin, err := env.AddUser(envtest.User{Name: "bench-admin", Groups: []string{"system:masters"}}, nil)
	if err != nil {
		return c, fmt.Errorf("creating an admin user: %w", err)
	}
	raw, err := admin.KubeConfig()
	if err != nil {
		return c, err
	}
	c.kubeconfig = filepath.Join(dir, "kubeconfig")
	if err := os.WriteFile(c.kubeconfig, raw, 0o600); err != nil {
		return c, err
	}
	// Writes go as protobuf, the cheapest for the API server; c.client
	// (the ProxyConfig, which has no protobuf form, and the replayed
	// list) speaks JSON, as the agent does.
	cfg := rest.CopyConfig(admin.Config())
	cfg.QPS, cfg.Burst = 10000, 20000
	if c.client, err = client.New(cfg, client.Options{Scheme: env.Scheme}); err != nil {
		return c, err
	}
	cfg = rest.CopyConfig(cfg)
	cfg.ContentType = "application/vnd.kubernetes.protobuf"
	if c.clientset, err = kubernetes.NewForConfig(cfg); err != nil {
		return c, err
	}
	for i := range namespaceCount {
		ns := &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: serviceKey(i).Namespace}}
		if _, err := c.clientset.CoreV1().Namespaces().Create(ctx, ns, metav1.CreateOptions{}); err != nil {
			return c, fmt.Errorf("creating namespace %s: %w", ns.Name, err)
		}
	}
	if minSyncInterval >= 0 {
		pc := &proxyv1alpha1.ProxyConfig{ObjectMeta: metav1.ObjectMeta{Name: "default"}}
		pc.Spec.MinSyncInterval = &metav1.Duration{Duration: minSyncInterval}
		if err := c.client.Create(ctx, pc); err != nil {
			return c, fmt.Errorf("creating ProxyConfig default: %w", err)
		}
	}
	return c, nil
}

func (c *cluster) stop() {
	if err := c.env.Stop(); err != nil {
		fmt.Fprintln(os.Stderr, "bench: stopping the API server:", err)
	}
}

// service is the Service for key at ip, port 80 to the pods' 8080.
func service(key types.NamespacedName, ip netip.Addr) *corev1.Service {
	return &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Namespace: key.Namespace, Name: key.Name},
		Spec: corev1.ServiceSpec{
			Type:      corev1.ServiceTypeClusterIP,
			ClusterIP: ip.String(),
			Ports: []corev1.ServicePort{{
				Name: "http", Port: servicePort, Protocol: corev1.ProtocolTCP, TargetPort: intstr.FromInt32(podPort),
			}},
		},
	}
}

// slice is the EndpointSlice of key with the given pods as ready
// endpoints on this node.
func slice(key types.NamespacedName, pods []int) *discoveryv1.EndpointSlice {
	return &discoveryv1.EndpointSlice{
		ObjectMeta: metav1.ObjectMeta{
			Namespace: key.Namespace, Name: key.Name,
			Labels: map[string]string{discoveryv1.LabelServiceName: key.Name},
		},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr.To("http"), Port: ptr.To[int32](podPort), Protocol: ptr.To(corev1.ProtocolTCP)}},
		Endpoints:   endpoints(pods),
	}
}

func endpoints(pods []int) []discoveryv1.Endpoint {
	eps := make([]discoveryv1.Endpoint, 0, len(pods))
	for _, p := range pods {
		eps = append(eps, discoveryv1.Endpoint{
			Addresses:  []string{podIP(p).String()},
			NodeName:   ptr.To(nodeName),
			Conditions: discoveryv1.EndpointConditions{Ready: ptr.To(true)},
		})
	}
	return eps
}

func basePods() []int {
	pods := make([]int, endpointsPerService)
	for i := range pods {
		pods[i] = i
	}
	return pods
}

// ensureServices creates Services created..n-1 with their slices, in
// parallel, and returns how long that took.
func (c *cluster) ensureServices(ctx context.Context, n int) (time.Duration, error) {
	if n <= c.created {
		return 0, nil
	}
	start := time.Now()
	var next atomic.Int64
	next.Store(int64(c.created))
	var (
		wg       sync.WaitGroup
		mu       sync.Mutex
		firstErr error
	)
	for range createWorkers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil {
					return
				}
				if err := c.createService(ctx, serviceKey(i), serviceIP(i), basePods()); err != nil {
					mu.Lock()
					if firstErr == nil {
						firstErr = err
					}
					mu.Unlock()
					next.Store(int64(n)) // stop the others
					return
				}
			}
		}()
	}
	wg.Wait()
	if firstErr == nil {
		firstErr = ctx.Err()
	}
	if firstErr != nil {
		return 0, firstErr
	}
	c.created = n
	return time.Since(start), nil
}

// createService creates the slice, then the Service. An object that
// already exists (a retried run) is fine.
func (c *cluster) createService(ctx context.Context, key types.NamespacedName, ip netip.Addr, pods []int) error {
	if err := c.createSlice(ctx, key, pods); err != nil {
		return err
	}
	_, err := c.clientset.CoreV1().Services(key.Namespace).Create(ctx, service(key, ip), metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating Service %s: %w", key, err)
	}
	return nil
}

func (c *cluster) createSlice(ctx context.Context, key types.NamespacedName, pods []int) error {
	_, err := c.clientset.DiscoveryV1().EndpointSlices(key.Namespace).Create(ctx, slice(key, pods), metav1.CreateOptions{})
	if err != nil && !apierrors.IsAlreadyExists(err) {
		return fmt.Errorf("creating EndpointSlice %s: %w", key, err)
	}
	return nil
}

// setEndpoints replaces the endpoints of key's slice with one merge
// patch: one write, as the endpointslice controller makes.
func (c *cluster) setEndpoints(ctx context.Context, key types.NamespacedName, pods []int) error {
	patch, err := json.Marshal(map[string]any{"endpoints": endpoints(pods)})
	if err != nil {
		return err
	}
	_, err = c.clientset.DiscoveryV1().EndpointSlices(key.Namespace).Patch(ctx, key.Name, types.MergePatchType, patch, metav1.PatchOptions{})
	if err != nil {
		return fmt.Errorf("patching EndpointSlice %s: %w", key, err)
	}
	return nil
}

// deleteService removes a Service and its slice.
func (c *cluster) deleteService(ctx context.Context, key types.NamespacedName) error {
	if err := c.clientset.CoreV1().Services(key.Namespace).Delete(ctx, key.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting Service %s: %w", key, err)
	}
	if err := c.clientset.DiscoveryV1().EndpointSlices(key.Namespace).Delete(ctx, key.Name, metav1.DeleteOptions{}); err != nil && !apierrors.IsNotFound(err) {
		return fmt.Errorf("deleting EndpointSlice %s: %w", key, err)
	}
	return nil
}
