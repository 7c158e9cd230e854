package kind_test

import (
	"net/http"
	"net/http/httptest"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
)

// TestDialThroughPodProxy checks, without a cluster, the request a dial
// sends (the pod proxy path and netexec's parameters, an IPv6 host
// included) and how it reads netexec's answer.
func TestDialThroughPodProxy(t *testing.T) {
	var got *http.Request
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		got = r
		_, _ = w.Write([]byte(`{"responses":["backend-a","backend-b"],"errors":["dial tcp: connect: connection refused"]}`))
	}))
	defer api.Close()
	cs, err := kubernetes.NewForConfig(&rest.Config{Host: api.URL})
	if err != nil {
		t.Fatal(err)
	}
	c := &cluster{cs: cs}
	pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: "ns", Name: "client"}}
	r, err := c.prober(pod).dial(t.Context(), frontend{"udp", "fd00:10:96::a", 90}, "hostname", 7)
	if err != nil {
		t.Fatal(err)
	}
	if got.URL.Path != "/api/v1/namespaces/ns/pods/client:8080/proxy/dial" {
		t.Errorf("path %q", got.URL.Path)
	}
	q := got.URL.Query()
	for k, want := range map[string]string{"request": "hostname", "protocol": "udp", "host": "fd00:10:96::a", "port": "90", "tries": "7"} {
		if q.Get(k) != want {
			t.Errorf("parameter %s = %q, want %q (query %q)", k, q.Get(k), want, got.URL.RawQuery)
		}
	}
	if len(r.Responses) != 2 || len(r.Errors) != 1 || clean(r, 2) {
		t.Errorf("answer read as %+v", r)
	}
	if hostNet := (&corev1.Pod{ObjectMeta: pod.ObjectMeta, Spec: corev1.PodSpec{HostNetwork: true}}); c.prober(hostNet).port != hostHTTPPort {
		t.Errorf("a host-network pod is asked on port %d, want %d", c.prober(hostNet).port, hostHTTPPort)
	}
}
