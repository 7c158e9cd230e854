package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"regexp"
	"strings"
	"sync"
	"time"

	"github.com/nftproxy/nftproxy/internal/netns"
)

// The benchmark's network: a node namespace the agent programs, a client
// namespace routed through it, and pods on a bridge in the node. Only
// namespaces named "npxbench<pid>-..." are created, and traffic flows only
// between them. It is the layout of internal/netnstest, rebuilt without
// testing.TB so that the harness can run as a plain program that cleans up
// on Ctrl-C.
//
//	client 192.168.0.2 ── 192.168.0.1 node 10.1.0.1 (br0) ── pod i 10.1.0.(11+i)
//	                                   192.168.255.1 ── sink 192.168.255.2 (owns 10.96.0.0/16)

const (
	netnsDir   = netns.Dir
	podPort    = 8080
	cmdTimeout = 30 * time.Second
)

var (
	nodeIPv4   = netip.MustParseAddr("192.168.0.1")
	clientIPv4 = netip.MustParseAddr("192.168.0.2")
)

// podIP is the address of pod i.
func podIP(i int) netip.Addr { return netip.AddrFrom4([4]byte{10, 1, 0, byte(11 + i)}) }

// topology is one instance of the network; close removes all of it.
type topology struct {
	prefix  string
	node    string // namespace names
	client  string
	sink    string
	pods    []string
	servers []net.Listener
	wg      sync.WaitGroup
}

var benchNSName = regexp.MustCompile(`^npxbench([0-9]+)-`)

var topoSeq int

// newTopology builds the network with the given number of pods, each
// serving TCP on podPort with its name. On error, whatever was built is
// removed.
func newTopology(ctx context.Context, pods int) (tp *topology, err error) {
	topoSeq++
	tp = &topology{prefix: fmt.Sprintf("npxbench%d-%d", os.Getpid(), topoSeq)}
	defer func() {
		if err != nil {
			tp.close()
			tp = nil
		}
	}()
	add := func(role string) (string, error) {
		name := tp.prefix + "-" + role
		if err := run(ctx, "ip", "netns", "add", name); err != nil {
			return "", err
		}
		return name, nil
	}
	if tp.node, err = add("node"); err != nil {
		return tp, err
	}
	if tp.client, err = add("client"); err != nil {
		return tp, err
	}
	if tp.sink, err = add("sink"); err != nil {
		return tp, err
	}
	steps := [][]string{
		{"ip", "-n", tp.node, "link", "set", "lo", "up"},
		{"ip", "-n", tp.client, "link", "set", "lo", "up"},
		// A router whose ICMP errors are not rate limited (these
		// sysctls are per namespace): before the rules for a ClusterIP
		// exist, the node answers a SYN to it with "net unreachable" at
		// once, instead of dropping it silently once past the limit,
		// which would stall a probe until its timeout.
		{"ip", "netns", "exec", tp.node, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1",
			"net.ipv4.icmp_ratelimit=0", "net.ipv4.icmp_msgs_per_sec=1000000", "net.ipv4.icmp_msgs_burst=1000000"},
		// Created inside the namespaces: the root namespace never sees them.
		{"ip", "-n", tp.client, "link", "add", "eth0", "type", "veth", "peer", "name", "client0", "netns", tp.node},
		{"ip", "-n", tp.client, "addr", "add", clientIPv4.String() + "/24", "dev", "eth0"},
		{"ip", "-n", tp.client, "link", "set", "eth0", "up"},
		{"ip", "-n", tp.client, "route", "add", "default", "via", nodeIPv4.String()},
		{"ip", "-n", tp.node, "addr", "add", nodeIPv4.String() + "/24", "dev", "client0"},
		{"ip", "-n", tp.node, "link", "set", "client0", "up"},
		// What the node does not proxy leaves by its default route, to a
		// sink that owns the whole Service range (a local route) and so
		// answers a SYN to any ClusterIP with a reset at once. A probe of
		// a ClusterIP not programmed yet fails fast: an ICMP error would
		// be dropped when it races connect (TcpExtLockDroppedIcmps) and
		// stall the probe until its timeout.
		{"ip", "-n", tp.sink, "link", "set", "lo", "up"},
		{"ip", "-n", tp.sink, "link", "add", "eth0", "type", "veth", "peer", "name", "sink0", "netns", tp.node},
		{"ip", "-n", tp.sink, "addr", "add", "192.168.255.2/30", "dev", "eth0"},
		{"ip", "-n", tp.sink, "link", "set", "eth0", "up"},
		{"ip", "-n", tp.sink, "route", "add", "default", "via", "192.168.255.1"},
		{"ip", "-n", tp.sink, "route", "add", "local", serviceRange, "dev", "lo"},
		{"ip", "-n", tp.node, "addr", "add", "192.168.255.1/30", "dev", "sink0"},
		{"ip", "-n", tp.node, "link", "set", "sink0", "up"},
		{"ip", "-n", tp.node, "route", "add", "default", "via", "192.168.255.2"},
		{"ip", "-n", tp.node, "link", "add", "br0", "type", "bridge"},
		{"ip", "-n", tp.node, "addr", "add", "10.1.0.1/24", "dev", "br0"},
		{"ip", "-n", tp.node, "link", "set", "br0", "up"},
	}
	for i := range pods {
		name, err := add(fmt.Sprintf("pod%d", i))
		if err != nil {
			return tp, err
		}
		tp.pods = append(tp.pods, name)
		peer := fmt.Sprintf("pod%d", i)
		steps = append(steps,
			[]string{"ip", "-n", name, "link", "set", "lo", "up"},
			[]string{"ip", "-n", name, "link", "add", "eth0", "type", "veth", "peer", "name", peer, "netns", tp.node},
			[]string{"ip", "-n", name, "addr", "add", podIP(i).String() + "/24", "dev", "eth0"},
			[]string{"ip", "-n", name, "link", "set", "eth0", "up"},
			[]string{"ip", "-n", name, "route", "add", "default", "via", "10.1.0.1"},
			[]string{"ip", "-n", tp.node, "link", "set", peer, "master", "br0"},
			[]string{"ip", "-n", tp.node, "link", "set", peer, "up"},
		)
	}
	for _, argv := range steps {
		if err := run(ctx, argv...); err != nil {
			return tp, err
		}
	}
	for i, name := range tp.pods {
		if err := tp.serve(name, fmt.Sprintf("pod%d", i)); err != nil {
			return tp, err
		}
	}
	// Links come up asynchronously: wait until every pod answers directly.
	p, err := newProber(tp.client)
	if err != nil {
		return tp, err
	}
	defer p.close()
	deadline := time.Now().Add(10 * time.Second)
	for i := range tp.pods {
		addr := netip.AddrPortFrom(podIP(i), podPort)
		for {
			if r := p.probe(addr, time.Second); r.err == nil {
				break
			} else if time.Now().After(deadline) {
				return tp, fmt.Errorf("pod %d not reachable from the client within 10s: %w", i, err)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}
	return tp, nil
}

// nodePath is the node namespace's file, for the agent's --netns.
func (tp *topology) nodePath() string { return netnsDir + "/" + tp.node }

// serve runs a TCP server on podPort inside namespace ns: it reads one
// line and answers with the pod's name, then closes.
func (tp *topology) serve(ns, name string) error {
	var l net.Listener
	if err := inNamespace(ns, func() (err error) {
		l, err = net.Listen("tcp", fmt.Sprintf(":%d", podPort))
		return err
	}); err != nil {
		return fmt.Errorf("serving in %s: %w", ns, err)
	}
	tp.servers = append(tp.servers, l)
	tp.wg.Add(1)
	go func() {
		defer tp.wg.Done()
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer func() { _ = c.Close() }()
				_ = c.SetDeadline(time.Now().Add(5 * time.Second))
				if _, err := bufio.NewReader(c).ReadString('\n'); err != nil {
					return
				}
				_, _ = io.WriteString(c, name+"\n")
			}()
		}
	}()
	return nil
}

// close stops the servers and deletes every namespace, which takes their
// links, rules and conntrack entries with them.
func (tp *topology) close() {
	for _, l := range tp.servers {
		_ = l.Close()
	}
	tp.wg.Wait()
	for _, ns := range append(append([]string{tp.client, tp.sink}, tp.pods...), tp.node) {
		if ns == "" {
			continue
		}
		if err := run(context.Background(), "ip", "netns", "del", ns); err != nil {
			fmt.Fprintln(os.Stderr, "bench: removing namespace:", err)
		}
	}
}

// inNamespace runs fn on a thread switched into namespace ns, so the
// sockets fn creates belong to it.
func inNamespace(ns string, fn func() error) error {
	return netns.Do(netnsDir+"/"+ns, fn)
}

// run runs a command, bounded in time; the error carries its output.
func run(ctx context.Context, argv ...string) error {
	ctx, cancel := context.WithTimeout(ctx, cmdTimeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, argv[0], argv[1:]...)
	cmd.WaitDelay = time.Second
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("%s: %w: %s", strings.Join(argv, " "), err, out)
	}
	return nil
}
