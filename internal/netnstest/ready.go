package netnstest

import (
	"encoding/json"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"
)

// ipLink is the part of `ip -j -d link show` that tells whether a link
// carries traffic yet.
type ipLink struct {
	Name      string   `json:"ifname"`
	Flags     []string `json:"flags"`
	OperState string   `json:"operstate"`
	LinkInfo  struct {
		Kind      string `json:"info_kind"`
		SlaveKind string `json:"info_slave_kind"`
		SlaveData struct {
			State string `json:"state"`
		} `json:"info_slave_data"`
	} `json:"linkinfo"`
}

// ipAddrs is the part of `ip -j addr show` that lists addresses.
type ipAddrs struct {
	Name  string `json:"ifname"`
	Addrs []struct {
		Local string `json:"local"`
	} `json:"addr_info"`
}

// WaitReady waits, bounded, until the namespace's links and addresses are
// usable: no IPv6 address is tentative (still in duplicate address
// detection), every veth that is up has its carrier, and every bridge port
// that is up forwards. Links come up asynchronously in the kernel; without
// this wait the first packets of a test can race them. Link and the
// topology call it; call it after configuring links by hand.
func (ns *NS) WaitReady(t testing.TB) {
	t.Helper()
	deadline := time.Now().Add(readyTimeout)
	for {
		pending, err := ns.notReady()
		if err != nil {
			t.Fatalf("netnstest: %v", err)
		}
		if len(pending) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("netnstest: %s not ready after %v: %s", ns.Name, readyTimeout, strings.Join(pending, "; "))
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// notReady describes what is not usable yet; empty means ready.
func (ns *NS) notReady() ([]string, error) {
	var links []ipLink
	if err := ns.ipJSON(&links, "-d", "link", "show"); err != nil {
		return nil, err
	}
	var pending []string
	for _, l := range links {
		if !slices.Contains(l.Flags, "UP") {
			continue
		}
		if l.LinkInfo.Kind == "veth" && l.OperState != "UP" {
			pending = append(pending, fmt.Sprintf("%s is %s", l.Name, l.OperState))
		}
		if l.LinkInfo.SlaveKind == "bridge" && l.LinkInfo.SlaveData.State != "forwarding" {
			pending = append(pending, fmt.Sprintf("bridge port %s is %s", l.Name, l.LinkInfo.SlaveData.State))
		}
	}
	var tentative []ipAddrs
	if err := ns.ipJSON(&tentative, "-6", "addr", "show", "tentative"); err != nil {
		return nil, err
	}
	for _, l := range tentative {
		for _, a := range l.Addrs {
			pending = append(pending, fmt.Sprintf("%s on %s is tentative", a.Local, l.Name))
		}
	}
	return pending, nil
}

// ipJSON runs `ip -j -n <name> args...` and decodes its output into v.
func (ns *NS) ipJSON(v any, args ...string) error {
	out, err := run(append([]string{"ip", "-j", "-n", ns.Name}, args...)...)
	if err != nil {
		return err
	}
	if strings.TrimSpace(out) == "" {
		return nil // older iproute2 prints nothing for an empty list
	}
	if err := json.Unmarshal([]byte(out), v); err != nil {
		return fmt.Errorf("ip %s in %s: decoding %q: %w", strings.Join(args, " "), ns.Name, out, err)
	}
	return nil
}
