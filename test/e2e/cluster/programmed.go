package cluster

import (
	"context"
	"fmt"
	"net/netip"
	"strings"
	"time"

	corev1 "k8s.io/api/core/v1"
)

// WaitProgrammed waits until every node's table holds svc's ClusterIPs
// (its other frontends come in the same write). Send nothing to a Service
// before: until its rules exist, a connection leaves the node unproxied,
// and the conntrack entry it leaves behind (SYN_SENT, for two minutes)
// catches the client's next attempts, which the kernel often makes from
// the same source port, so that they bypass the proxy even once the rules
// are there.
func (c *Cluster) WaitProgrammed(ctx context.Context, svc *corev1.Service, timeout time.Duration) error {
	type member struct{ set, element string }
	var want []member
	for _, ip := range svc.Spec.ClusterIPs {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			continue
		}
		m := member{set: "cluster-ips4", element: fmt.Sprintf("%s comment %q", a, svc.Namespace+"/"+svc.Name)}
		if a.Is6() {
			m.set = "cluster-ips6"
		}
		want = append(want, m)
	}
	deadline := time.Now().Add(timeout)
	for _, n := range c.Nodes {
		for _, m := range want {
			for {
				out, err := n.NS.Run("nft", "list", "set", "inet", "nftproxy", m.set)
				if err == nil && strings.Contains(out, m.element) {
					break
				}
				if time.Now().After(deadline) || ctx.Err() != nil {
					return fmt.Errorf("%s: Service %s/%s not programmed after %v (%s not in set %s)", n.Name, svc.Namespace, svc.Name, timeout, m.element, m.set)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	return nil
}
