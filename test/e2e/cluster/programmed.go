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
	var want []string
	for _, ip := range svc.Spec.ClusterIPs {
		a, err := netip.ParseAddr(ip)
		if err != nil {
			continue
		}
		set := "cluster-ips4"
		if a.Is6() {
			set = "cluster-ips6"
		}
		want = append(want, set+" "+fmt.Sprintf("%s comment %q", a, svc.Namespace+"/"+svc.Name))
	}
	deadline := time.Now().Add(timeout)
	for _, n := range c.Nodes {
		for _, w := range want {
			set, element, _ := strings.Cut(w, " ")
			for {
				out, err := n.NS.Run("nft", "list", "set", "inet", "nftproxy", set)
				if err == nil && strings.Contains(out, element) {
					break
				}
				if time.Now().After(deadline) || ctx.Err() != nil {
					return fmt.Errorf("%s: Service %s/%s not programmed after %v (%s not in set %s)", n.Name, svc.Namespace, svc.Name, timeout, element, set)
				}
				time.Sleep(20 * time.Millisecond)
			}
		}
	}
	return nil
}
