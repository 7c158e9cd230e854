package dataplane

import (
	"context"
	"errors"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/nftables"
	"github.com/google/nftables/userdata"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"

	proxyv1alpha1 "github.com/nftproxy/nftproxy/api/v1alpha1"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

const kernelTimeout = 2 * time.Second

// kernelSnapshot programs the topology's pods as Services: web (dual-stack
// ClusterIP, NodePort, externalIP), dns (53 on UDP and TCP), lb (a
// LoadBalancer IP) and empty (no endpoints).
func kernelSnapshot(tp *netnstest.Topology, webPods ...int) *Snapshot {
	web := service("default", "web", []string{"10.96.0.10", "fd00:96::10"}, []string{"http:80"},
		withNodePorts(30080), withExternalIPs("203.0.113.10"))
	var eps4, eps6 []ep
	for _, i := range webPods {
		eps4 = append(eps4, ready(tp.Pods[i].IPv4.String()))
		eps6 = append(eps6, ready(tp.Pods[i].IPv6.String()))
	}
	dns := service("kube-system", "dns", []string{"10.96.0.53"}, []string{"dns:53/UDP", "dns-tcp:53/TCP"})
	lb := service("default", "lb", []string{"10.96.0.20"}, []string{"80"}, withLoadBalancer(corev1.LoadBalancerIngress{IP: "198.51.100.20"}))
	empty := service("default", "empty", []string{"10.96.0.99"}, []string{"80"}, withNodePorts(30099))
	// Policies: sticky has ClientIP affinity (dual-stack); guarded is a
	// LoadBalancer with source ranges and externalTrafficPolicy Local.
	sticky := service("default", "sticky", []string{"10.96.0.30", "fd00:96::30"}, []string{"http:80"}, withAffinity(3))
	guarded := service("default", "guarded", []string{"10.96.0.40", "fd00:96::40"}, []string{"http:80"},
		withLoadBalancer(corev1.LoadBalancerIngress{IP: "198.51.100.40"}, corev1.LoadBalancerIngress{IP: "2001:db8::40"}),
		withSourceRanges("192.168.0.0/30", "10.1.0.0/16", "fd00:1::/64"), withExternalPolicyLocal())
	guarded.Spec.Ports[0].NodePort = 30040
	snap := newSnapshot(
		state(web, slice(web, "web-v4", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, eps4...),
			slice(web, "web-v6", discoveryv1.AddressTypeIPv6, []string{"http:8080"}, eps6...)),
		state(dns, slice(dns, "dns", discoveryv1.AddressTypeIPv4, []string{"dns:5353/UDP", "dns-tcp:5353/TCP"}, eps4...)),
		state(lb, slice(lb, "lb", discoveryv1.AddressTypeIPv4, []string{"8080"}, ready(tp.Pods[len(tp.Pods)-1].IPv4.String()))),
		state(empty),
		state(sticky, slice(sticky, "sticky-v4", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, eps4...),
			slice(sticky, "sticky-v6", discoveryv1.AddressTypeIPv6, []string{"http:8080"}, eps6...)),
		state(guarded, slice(guarded, "guarded-v4", discoveryv1.AddressTypeIPv4, []string{"http:8080"}, remote(eps4, 1)...),
			slice(guarded, "guarded-v6", discoveryv1.AddressTypeIPv6, []string{"http:8080"}, remote(eps6, 1)...)),
	)
	snap.NodeAddresses = []netip.Addr{addr("192.168.0.1"), addr("fd00:1::1"), addr("10.1.0.1"), addr("fd00:10::1"), addr("127.0.0.1")}
	return snap
}

func startPods(t *testing.T, tp *netnstest.Topology) {
	for _, p := range tp.Pods {
		p.ServeTCP(t, ":8080", p.Name)
		p.ServeTCP(t, ":5353", p.Name)
		p.ServeUDP(t, ":5353", p.Name)
	}
}

func newApplier(t *testing.T, ns *netnstest.NS) *KernelApplier {
	t.Helper()
	k, err := NewKernelApplier(WithNetNS(ns.Path()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = k.Close() })
	return k
}

func apply(t *testing.T, k *KernelApplier, rs *Ruleset) {
	t.Helper()
	if err := k.Apply(context.Background(), rs); err != nil {
		t.Fatal(err)
	}
}

// spread connects n times and counts which server answered and with what
// source address.
func spread(t *testing.T, from *netnstest.NS, target string, n int, udp bool) map[netnstest.Reply]int {
	t.Helper()
	got := map[netnstest.Reply]int{}
	for range n {
		var r netnstest.Reply
		var err error
		if udp {
			r, err = from.AskUDP(target, kernelTimeout)
		} else {
			r, err = from.AskTCP(target, kernelTimeout)
		}
		if err != nil {
			t.Fatalf("%s: %v", target, err)
		}
		got[r]++
	}
	return got
}

func servers(got map[netnstest.Reply]int) []string {
	var out []string
	for r := range got {
		if !slices.Contains(out, r.Server) {
			out = append(out, r.Server)
		}
	}
	sort.Strings(out)
	return out
}

func sources(got map[netnstest.Reply]int) []string {
	var out []string
	for r := range got {
		if !slices.Contains(out, r.Source.String()) {
			out = append(out, r.Source.String())
		}
	}
	sort.Strings(out)
	return out
}

func TestKernelServices(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 4) // pod3 is no endpoint of web: a plain client pod
	startPods(t, tp)
	k := newApplier(t, tp.Node)
	apply(t, k, Compute(kernelSnapshot(tp, 0, 1, 2)))

	check := func(name string, from *netnstest.NS, target string, udp bool, wantServers, wantSources []string) {
		t.Run(name, func(t *testing.T) {
			got := spread(t, from, target, 60, udp)
			if s := servers(got); !slices.Equal(s, wantServers) {
				t.Errorf("servers %v, want %v (%v)", s, wantServers, got)
			}
			if s := sources(got); !slices.Equal(s, wantSources) {
				t.Errorf("sources %v, want %v", s, wantSources)
			}
			if len(wantServers) == 3 {
				for r, n := range got {
					if n < 5 {
						t.Errorf("uneven spread: %s answered %d of 60", r.Server, n)
					}
				}
			}
		})
	}
	all := []string{"pod0", "pod1", "pod2"}
	check("ClusterIP from outside the cluster: every endpoint, masqueraded", tp.Client, "10.96.0.10:80", false, all, []string{"10.1.0.1"})
	check("ClusterIP from a pod keeps the pod's source", tp.Pods[3].NS, "10.96.0.10:80", false, all, []string{"10.1.0.14"})
	check("ClusterIP from the node", tp.Node, "10.96.0.10:80", false, all, []string{"10.1.0.1"})
	check("UDP on 53, every endpoint", tp.Pods[3].NS, "10.96.0.53:53", true, all, []string{"10.1.0.14"})
	check("TCP on 53", tp.Pods[3].NS, "10.96.0.53:53", false, all, []string{"10.1.0.14"})
	check("NodePort, masqueraded", tp.Client, "192.168.0.1:30080", false, all, []string{"10.1.0.1"})
	check("externalIP", tp.Client, "203.0.113.10:80", false, all, []string{"10.1.0.1"})
	check("LoadBalancer IP", tp.Client, "198.51.100.20:80", false, []string{"pod3"}, []string{"10.1.0.1"})
	check("IPv6 ClusterIP", tp.Client, "[fd00:96::10]:80", false, all, []string{"fd00:10::1"})
	check("IPv6 ClusterIP from a pod", tp.Pods[3].NS, "[fd00:96::10]:80", false, all, []string{"fd00:10::14"})
	check("IPv6 NodePort", tp.Client, "[fd00:1::1]:30080", false, all, []string{"fd00:10::1"})

	t.Run("hairpin is masqueraded", func(t *testing.T) {
		got := spread(t, tp.Pods[0].NS, "10.96.0.10:80", 60, false)
		for r := range got {
			want := "10.1.0.11"
			if r.Server == "pod0" {
				want = "10.1.0.1"
			}
			if r.Source.String() != want {
				t.Errorf("%s saw %s, want %s", r.Server, r.Source, want)
			}
		}
		if len(servers(got)) != 3 {
			t.Errorf("servers %v", servers(got))
		}
	})

	refused := func(name string, from *netnstest.NS, target string) {
		t.Run(name, func(t *testing.T) {
			start := time.Now()
			_, err := from.AskTCP(target, kernelTimeout)
			if !errors.Is(err, syscall.ECONNREFUSED) {
				t.Fatalf("got %v, want connection refused", err)
			}
			if d := time.Since(start); d > time.Second {
				t.Errorf("refusal took %v", d)
			}
		})
	}
	refused("no endpoints: refused at once", tp.Client, "10.96.0.99:80")
	refused("no endpoints, from the node", tp.Node, "10.96.0.99:80")
	refused("NodePort without endpoints", tp.Client, "192.168.0.1:30099")
	refused("unused ClusterIP port", tp.Client, "10.96.0.10:81")
	refused("unused ClusterIP port from a pod", tp.Pods[0].NS, "10.96.0.10:8080")
	t.Run("UDP to an unused ClusterIP port is refused", func(t *testing.T) {
		if _, err := tp.Client.AskUDP("10.96.0.10:53", kernelTimeout); !errors.Is(err, syscall.ECONNREFUSED) {
			t.Fatalf("got %v, want connection refused", err)
		}
	})
	t.Run("nft lists the table without error", func(t *testing.T) {
		requireNft(t)
		cmd := exec.Command("ip", "netns", "exec", tp.Node.Name, "nft", "list", "ruleset")
		var stderr strings.Builder
		cmd.Stderr = &stderr
		if err := cmd.Run(); err != nil || stderr.Len() > 0 {
			t.Fatalf("nft list ruleset: %v %s", err, stderr.String())
		}
	})
}

func TestKernelMasqueradeConfig(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 2)
	startPods(t, tp)
	k := newApplier(t, tp.Node)
	snap := kernelSnapshot(tp, 0, 1)
	snap.Config.NodePortAddresses = []proxyv1alpha1.CIDR{"192.168.0.0/24"}
	apply(t, k, Compute(snap))
	if _, err := tp.Pods[0].AskTCP("10.1.0.1:30080", kernelTimeout); err == nil {
		t.Error("NodePort answered on an address outside nodePortAddresses")
	}
	if _, err := tp.Client.AskTCP("192.168.0.1:30080", kernelTimeout); err != nil {
		t.Errorf("NodePort on a configured address: %v", err)
	}
	snap.Config.MasqueradeAll = true
	apply(t, k, Compute(snap))
	if got := sources(spread(t, tp.Pods[1].NS, "10.96.0.10:80", 10, false)); !slices.Equal(got, []string{"10.1.0.1", "10.1.0.12"}) && !slices.Equal(got, []string{"10.1.0.1"}) {
		t.Errorf("masqueradeAll: sources %v", got)
	}
}

// TestKernelEndpointChanges adds and removes endpoints under an open
// connection: it survives as long as its endpoint does.
func TestKernelEndpointChanges(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 3)
	startPods(t, tp)
	k := newApplier(t, tp.Node)
	c := NewComputer()
	apply(t, k, c.Compute(kernelSnapshot(tp, 0, 1)))

	// Hold a connection to pod0.
	var held *netnstest.Conn
	for range 50 {
		conn, r, err := tp.Client.DialTCP("10.96.0.10:80", kernelTimeout)
		if err != nil {
			t.Fatal(err)
		}
		if r.Server == "pod0" {
			held = conn
			break
		}
		_ = conn.Close()
	}
	if held == nil {
		t.Fatal("never reached pod0")
	}
	defer func() { _ = held.Close() }()
	alive := func(step string) {
		if r, err := held.Ask(); err != nil || r.Server != "pod0" {
			t.Fatalf("%s: established connection broke: %v %v", step, r, err)
		}
	}
	steps := []struct {
		name string
		pods []int
		want []string
	}{
		{"add pod2", []int{0, 1, 2}, []string{"pod0", "pod1", "pod2"}},
		{"remove pod1", []int{0, 2}, []string{"pod0", "pod2"}},
		{"only pod0", []int{0}, []string{"pod0"}},
	}
	for _, s := range steps {
		apply(t, k, c.Compute(kernelSnapshot(tp, s.pods...)))
		if got := servers(spread(t, tp.Client, "10.96.0.10:80", 40, false)); !slices.Equal(got, s.want) {
			t.Errorf("%s: servers %v, want %v", s.name, got, s.want)
		}
		alive(s.name)
	}
	apply(t, k, c.Compute(kernelSnapshot(tp)))
	if _, err := tp.Client.AskTCP("10.96.0.10:80", kernelTimeout); !errors.Is(err, syscall.ECONNREFUSED) {
		t.Errorf("all endpoints removed: %v, want refused", err)
	}
	apply(t, k, c.Compute(kernelSnapshot(tp, 1, 2)))
	if got := servers(spread(t, tp.Client, "10.96.0.10:80", 40, false)); !slices.Equal(got, []string{"pod1", "pod2"}) {
		t.Errorf("back again: servers %v", got)
	}
}

// TestKernelRestart: a second applier (a restarted agent) replaces the
// table of the first while a client keeps connecting: no connection fails.
func TestKernelRestart(t *testing.T) {
	netnstest.Require(t)
	tp := netnstest.NewTopology(t, 2)
	startPods(t, tp)
	apply(t, newApplier(t, tp.Node), Compute(kernelSnapshot(tp, 0, 1)))

	stop := make(chan struct{})
	var failures, attempts int
	var mu sync.Mutex
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		deadline := time.Now().Add(20 * time.Second)
		for time.Now().Before(deadline) {
			select {
			case <-stop:
				return
			default:
			}
			_, err := tp.Client.AskTCP("10.96.0.10:80", kernelTimeout)
			mu.Lock()
			attempts++
			if err != nil {
				failures++
				t.Logf("connection failed during restart: %v", err)
			}
			mu.Unlock()
		}
	}()
	// A table rebuilt from nothing refused about one connection in 300
	// takeovers here; in place, none.
	const takeovers = 100
	for range takeovers {
		k := newApplier(t, tp.Node)
		apply(t, k, Compute(kernelSnapshot(tp, 0, 1)))
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	wg.Wait()
	if failures > 0 || attempts < takeovers {
		t.Errorf("%d of %d connections failed across %d takeovers", failures, attempts, takeovers)
	}
}

// TestKernelReplaceOldTable: a new applier takes over a table that an
// older version (or a person) left different, with extra chains, sets and
// rules, or a set of another shape: Replace leaves exactly what a fresh
// table holds, and traffic flows.
func TestKernelReplaceOldTable(t *testing.T) {
	netnstest.Require(t)
	requireNft(t)
	tp := netnstest.NewTopology(t, 2)
	startPods(t, tp)
	rs := Compute(kernelSnapshot(tp, 0, 1))
	apply(t, newApplier(t, tp.Node), rs)
	fresh := normalizeNft(tp.Node.Exec(t, "nft", "list", "table", "inet", TableName))

	edits := map[string]string{
		"extra objects": "add set inet nftproxy old-set { type ipv4_addr; elements = { 192.0.2.1 } }\n" +
			"add chain inet nftproxy old-chain\n" +
			"add rule inet nftproxy old-chain ip daddr @old-set drop\n" +
			"add chain inet nftproxy old-base { type filter hook input priority 0; }\n" +
			"add rule inet nftproxy old-base jump old-chain\n" +
			"add rule inet nftproxy nat-prerouting jump old-chain\n",
		"a set of another shape": "flush table inet nftproxy\n" +
			"delete set inet nftproxy hairpin4\n" +
			"add set inet nftproxy hairpin4 { type inet_service; }\n",
	}
	for name, edit := range edits {
		f := filepath.Join(t.TempDir(), "edit.nft")
		if err := os.WriteFile(f, []byte(edit), 0o600); err != nil {
			t.Fatal(err)
		}
		tp.Node.Exec(t, "nft", "-f", f)
		k := newApplier(t, tp.Node)
		if err := k.Replace(context.Background(), rs); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if got := normalizeNft(tp.Node.Exec(t, "nft", "list", "table", "inet", TableName)); got != fresh {
			t.Errorf("%s: after Replace:\n%s\nwant:\n%s", name, got, fresh)
		}
		if got := servers(spread(t, tp.Client, "10.96.0.10:80", 20, false)); !slices.Equal(got, []string{"pod0", "pod1"}) {
			t.Errorf("%s: servers %v after Replace", name, got)
		}
	}
}

// TestKernelOtherTablesUntouched: a table standing for a CNI's survives
// apply, resync and cleanup unchanged.
func TestKernelOtherTablesUntouched(t *testing.T) {
	netnstest.Require(t)
	requireNft(t)
	tp := netnstest.NewTopology(t, 1)
	other := "table inet cni {\n\tset pods { type ipv4_addr; elements = { 10.1.0.11 } }\n\tchain forward {\n\t\ttype filter hook forward priority 0; policy accept;\n\t\tip saddr @pods counter accept\n\t}\n}\n"
	f, err := os.CreateTemp(t.TempDir(), "cni*.nft")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteString(other); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	tp.Node.Exec(t, "nft", "-f", f.Name())
	before := tp.Node.Exec(t, "nft", "list", "table", "inet", "cni")

	k := newApplier(t, tp.Node)
	c := NewComputer()
	apply(t, k, c.Compute(kernelSnapshot(tp, 0)))
	apply(t, k, c.Compute(kernelSnapshot(tp)))
	if err := k.Replace(context.Background(), c.Compute(kernelSnapshot(tp, 0))); err != nil {
		t.Fatal(err)
	}
	if got := tp.Node.Exec(t, "nft", "list", "table", "inet", "cni"); got != before {
		t.Errorf("the other table changed:\n%s\nwas:\n%s", got, before)
	}
	if err := k.Cleanup(context.Background()); err != nil {
		t.Fatal(err)
	}
	if err := k.Cleanup(context.Background()); err != nil {
		t.Fatalf("second cleanup: %v", err)
	}
	if got := tp.Node.Exec(t, "nft", "list", "ruleset"); !strings.Contains(got, "table inet cni") || strings.Contains(got, TableName) {
		t.Errorf("after cleanup:\n%s", got)
	}
	if got := tp.Node.Exec(t, "nft", "list", "table", "inet", "cni"); got != before {
		t.Errorf("cleanup changed the other table:\n%s", got)
	}
}

// TestKernelGolden: what the kernel holds, as nft prints it, matches the
// golden file (set elements sorted, as their order in a hash is not ours).
func TestKernelGolden(t *testing.T) {
	netnstest.Require(t)
	requireNft(t)
	tp := netnstest.NewTopology(t, 3)
	k := newApplier(t, tp.Node)
	apply(t, k, Compute(kernelSnapshot(tp, 0, 1, 2)))
	golden(t, "kernel-example.nft", normalizeNft(tp.Node.Exec(t, "nft", "list", "table", "inet", TableName)))
	golden(t, "kernel-example.netlink", listOverNetlink(t, tp.Node))

	// And the same after a diff lands on top, compared with a fresh replace.
	c := NewComputer()
	k2 := newApplier(t, tp.Node)
	apply(t, k2, c.Compute(kernelSnapshot(tp, 0)))
	apply(t, k2, c.Compute(kernelSnapshot(tp, 0, 1, 2)))
	afterDiff := normalizeNft(tp.Node.Exec(t, "nft", "list", "table", "inet", TableName))
	if err := k2.Replace(context.Background(), c.Compute(kernelSnapshot(tp, 0, 1, 2))); err != nil {
		t.Fatal(err)
	}
	if fresh := normalizeNft(tp.Node.Exec(t, "nft", "list", "table", "inet", TableName)); fresh != afterDiff {
		t.Errorf("diff-applied table differs from a fresh replace:\n%s\n---\n%s", afterDiff, fresh)
	}
}

// listOverNetlink reads our table back with google/nftables: every chain
// with its hook and rule comments, every set with its elements' count.
func listOverNetlink(t *testing.T, ns *netnstest.NS) string {
	t.Helper()
	f, err := os.Open(ns.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = f.Close() }()
	conn, err := nftables.New(nftables.WithNetNSFd(int(f.Fd())))
	if err != nil {
		t.Fatal(err)
	}
	table := &nftables.Table{Name: TableName, Family: nftables.TableFamilyINet}
	comments := ruleComments(t, int(f.Fd()))
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, c := range chains {
		if c.Table.Name != TableName {
			continue
		}
		rules := comments[c.Name]
		line := fmt.Sprintf("chain %s: %d rules", c.Name, len(rules))
		if c.Hooknum != nil {
			line += fmt.Sprintf(", hook %d priority %d", *c.Hooknum, *c.Priority)
		}
		for _, comment := range rules {
			if comment != "" {
				line += fmt.Sprintf(", %q", comment)
			}
		}
		lines = append(lines, line)
	}
	sets, err := conn.GetSets(table)
	if err != nil {
		t.Fatal(err)
	}
	for _, set := range sets {
		elems, err := conn.GetSetElements(set)
		if err != nil {
			t.Fatal(err)
		}
		lines = append(lines, fmt.Sprintf("set %s: map %v, %d elements", set.Name, set.IsMap, len(elems)))
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n") + "\n"
}

// ruleComments lists the comment of every rule of our table, by chain,
// over raw netlink: google/nftables cannot decode the ct expressions nft
// writes (a direction is one byte, where it expects four).
func ruleComments(t *testing.T, netnsFd int) map[string][]string {
	t.Helper()
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, &netlink.Config{NetNS: netnsFd})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = conn.Close() }()
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_RULE_TABLE, TableName)
	attrs, err := ae.Encode()
	if err != nil {
		t.Fatal(err)
	}
	msgs, err := conn.Execute(netlink.Message{
		Header: netlink.Header{Type: netlink.HeaderType(nfnlSubsysNFTables<<8 | unix.NFT_MSG_GETRULE), Flags: netlink.Request | netlink.Dump},
		Data:   append([]byte{unix.NFPROTO_INET, unix.NFNETLINK_V0, 0, 0}, attrs...),
	})
	if err != nil {
		t.Fatal(err)
	}
	out := map[string][]string{}
	for _, m := range msgs {
		ad, err := netlink.NewAttributeDecoder(m.Data[4:])
		if err != nil {
			t.Fatal(err)
		}
		var chain, comment string
		for ad.Next() {
			switch ad.Type() {
			case unix.NFTA_RULE_CHAIN:
				chain = ad.String()
			case unix.NFTA_RULE_USERDATA:
				comment, _ = userdata.GetString(ad.Bytes(), userdata.TypeComment)
			}
		}
		if err := ad.Err(); err != nil {
			t.Fatal(err)
		}
		out[chain] = append(out[chain], comment)
	}
	return out
}

func requireNft(t *testing.T) {
	if _, err := exec.LookPath("nft"); err != nil {
		t.Skip("needs the nft binary (Debian package nftables) to read the table back")
	}
}

var elementsBlock = regexp.MustCompile(`(?s)elements = \{ (.*?) \}`)

// normalizeNft sorts the elements inside each `elements = { ... }` block
// and puts one per line.
func normalizeNft(s string) string {
	return elementsBlock.ReplaceAllStringFunc(s, func(block string) string {
		inner := elementsBlock.FindStringSubmatch(block)[1]
		var items []string
		for _, it := range strings.Split(inner, ",") {
			if it = strings.TrimSpace(it); it != "" {
				items = append(items, it)
			}
		}
		sort.Strings(items)
		return "elements = {\n\t\t\t" + strings.Join(items, ",\n\t\t\t") + "\n\t\t}"
	})
}
