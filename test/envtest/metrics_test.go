package envtest_test

import (
	"context"
	"crypto/tls"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	authenticationv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/nftproxy/nftproxy/internal/netnstest"
	"github.com/nftproxy/nftproxy/test/testenv"
)

// TestAgentSecureMetrics runs the binary as deployed (--metrics-secure):
// /metrics answers only clients the API server authenticates and allows
// to GET /metrics, as the metrics-reader ClusterRole does.
func TestAgentSecureMetrics(t *testing.T) {
	netnstest.Require(t)
	env := testenv.Start(t)
	ctx := context.Background()
	binary := buildAgent(t)
	kubeconfigPath := deployedIdentity(t, env)
	node := netnstest.New(t, "node")
	healthAddress, metricsAddress := freeLoopbackAddress(t), freeLoopbackAddress(t)
	startAgent(t, binary,
		"--kubeconfig", kubeconfigPath,
		"--node-name", "envtest-node",
		"--health-probe-bind-address", healthAddress,
		"--metrics-bind-address", metricsAddress,
		"--metrics-secure",
		"--netns", node.Path(),
	)

	clientset, err := kubernetes.NewForConfig(env.Config)
	if err != nil {
		t.Fatal(err)
	}
	token := func(name string) string {
		t.Helper()
		sa := &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Namespace: "nftproxy-system", Name: name}}
		if err := env.Client.Create(ctx, sa); err != nil {
			t.Fatal(err)
		}
		tr, err := clientset.CoreV1().ServiceAccounts("nftproxy-system").CreateToken(ctx, name, &authenticationv1.TokenRequest{}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return tr.Status.Token
	}
	reader, nobody := token("prometheus"), token("nobody")
	if err := env.Client.Create(ctx, &rbacv1.ClusterRoleBinding{
		ObjectMeta: metav1.ObjectMeta{Name: "prometheus-reads-nftproxy"},
		RoleRef:    rbacv1.RoleRef{APIGroup: "rbac.authorization.k8s.io", Kind: "ClusterRole", Name: "nftproxy-metrics-reader"},
		Subjects:   []rbacv1.Subject{{Kind: "ServiceAccount", Namespace: "nftproxy-system", Name: "prometheus"}},
	}); err != nil {
		t.Fatal(err)
	}

	get := func(bearer string) (int, string, error) {
		// The agent's certificate is self-signed, as controller-runtime's
		// secure serving makes it without one given.
		c := http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}}} //nolint:gosec // a test of authentication, not of the certificate
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, "https://"+metricsAddress+"/metrics", nil)
		if err != nil {
			return 0, "", err
		}
		if bearer != "" {
			req.Header.Set("Authorization", "Bearer "+bearer)
		}
		resp, err := c.Do(req)
		if err != nil {
			return 0, "", err
		}
		defer func() { _ = resp.Body.Close() }()
		body, err := io.ReadAll(resp.Body)
		return resp.StatusCode, string(body), err
	}
	waitFor(t, 60*time.Second, "the allowed scraper to read the agent's metrics", func() error {
		code, body, err := get(reader)
		if err != nil {
			return err
		}
		if code != http.StatusOK || !strings.Contains(body, "nftproxy_sync_proxy_rules_duration_seconds") {
			return fmt.Errorf("status %d: %.200s", code, body)
		}
		return nil
	})
	for name, bearer := range map[string]string{"anonymous": "", "a ServiceAccount not allowed": nobody} {
		code, _, err := get(bearer)
		if err != nil {
			t.Fatal(err)
		}
		if code != http.StatusUnauthorized && code != http.StatusForbidden {
			t.Errorf("%s: status %d, want 401 or 403", name, code)
		}
	}
}
