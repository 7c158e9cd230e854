package conntrack

import (
	"net/netip"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

func ap(s string) netip.AddrPort { return netip.MustParseAddrPort(s) }

// port is a Frontend with a port and no address: a NodePort.
func port(p uint16) netip.AddrPort { return netip.AddrPortFrom(netip.Addr{}, p) }

// udp is a UDP entry from client to orig, answered from reply.
func udp(client, orig, reply string) entry {
	c, o, r := ap(client), ap(orig), ap(reply)
	return entry{
		key:          entryKey{src: c.Addr(), dst: o.Addr(), srcPort: c.Port(), dstPort: o.Port(), proto: unix.IPPROTO_UDP},
		family:       familyOf(o.Addr()),
		proto:        unix.IPPROTO_UDP,
		origDst:      o.Addr(),
		origDstPort:  o.Port(),
		replySrc:     r.Addr(),
		replySrcPort: r.Port(),
	}
}

func TestMatcher(t *testing.T) {
	tcp := udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.11:5353")
	tcp.proto = unix.IPPROTO_TCP
	for _, tc := range []struct {
		name  string
		flow  Flow
		entry entry
		want  bool
	}{
		{"endpoint", Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.11:5353"), true},
		{"endpoint any port", Flow{Frontend: ap("10.96.0.10:53"), Endpoint: netip.AddrPortFrom(netip.MustParseAddr("10.1.0.11"), 0)}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.11:9999"), true},
		{"other endpoint", Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.12:5353"), false},
		{"other endpoint port", Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.11:5354"), false},
		{"other frontend", Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "10.96.0.11:53", "10.1.0.11:5353"), false},
		{"other frontend port", Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "10.96.0.10:54", "10.1.0.11:5353"), false},
		{"tcp", Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, tcp, false},
		{"nodeport", Flow{port(30053), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "192.168.0.1:30053", "10.1.0.11:5353"), true},
		{"nodeport unspecified", Flow{ap("0.0.0.0:30053"), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "10.1.0.1:30053", "10.1.0.11:5353"), true},
		{"nodeport other port", Flow{port(30053), ap("10.1.0.11:5353")}, udp("192.168.0.2:40000", "192.168.0.1:30054", "10.1.0.11:5353"), false},
		{"frontend only", Flow{Frontend: ap("10.96.0.10:53")}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.96.0.10:53"), true},
		{"frontend only other", Flow{Frontend: ap("10.96.0.10:53")}, udp("192.168.0.2:40000", "10.96.0.11:53", "10.96.0.11:53"), false},
		{"frontend only keeps DNATed", Flow{Frontend: ap("10.96.0.10:53")}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.11:5353"), false},
		{"port only keeps DNATed", Flow{Frontend: port(30053)}, udp("192.168.0.2:40000", "192.168.0.1:30053", "10.1.0.11:5353"), false},
		{"port only both families", Flow{Frontend: port(30053)}, udp("[fd00:1::2]:40000", "[fd00:1::1]:30053", "[fd00:1::1]:30053"), true},
		{"unspecified v4 is v4 only", Flow{Frontend: ap("0.0.0.0:30053")}, udp("[fd00:1::2]:40000", "[fd00:1::1]:30053", "[fd00:1::1]:30053"), false},
		{"v6", Flow{ap("[fd00:96::10]:53"), ap("[fd00:10::11]:5353")}, udp("[fd00:1::2]:40000", "[fd00:96::10]:53", "[fd00:10::11]:5353"), true},
		{"v6 other endpoint", Flow{ap("[fd00:96::10]:53"), ap("[fd00:10::11]:5353")}, udp("[fd00:1::2]:40000", "[fd00:96::10]:53", "[fd00:10::12]:5353"), false},
		{"mapped", Flow{ap("[::ffff:10.96.0.10]:53"), ap("[::ffff:10.1.0.11]:5353")}, udp("192.168.0.2:40000", "10.96.0.10:53", "10.1.0.11:5353"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := newMatcher(tc.flow)
			if err != nil {
				t.Fatal(err)
			}
			if got := m.matches(tc.entry); got != tc.want {
				t.Errorf("%s matches %+v: %v, want %v", tc.flow, tc.entry, got, tc.want)
			}
		})
	}
}

func TestMatcherInvalid(t *testing.T) {
	for _, tc := range []struct {
		flow Flow
		why  string
	}{
		{Flow{}, "no frontend port"},
		{Flow{Frontend: netip.AddrPortFrom(netip.MustParseAddr("10.96.0.10"), 0)}, "no frontend port"},
		{Flow{ap("10.96.0.10:53"), ap("[fd00:10::11]:5353")}, "different address families"},
		{Flow{ap("[fd00:96::10]:53"), ap("10.1.0.11:5353")}, "different address families"},
		{Flow{ap("10.96.0.10:53"), ap("0.0.0.0:5353")}, "unspecified endpoint"},
		{Flow{ap("10.96.0.10:53"), port(5353)}, "endpoint port without endpoint address"},
	} {
		_, err := newMatcher(tc.flow)
		if err == nil || !strings.Contains(err.Error(), tc.why) {
			t.Errorf("newMatcher(%s): %v, want an error saying %q", tc.flow, err, tc.why)
		}
	}
}

func TestMatcherFamilies(t *testing.T) {
	for _, tc := range []struct {
		flow Flow
		want []uint8
	}{
		{Flow{Frontend: ap("10.96.0.10:53")}, []uint8{unix.AF_INET}},
		{Flow{Frontend: port(30053), Endpoint: ap("[fd00:10::11]:5353")}, []uint8{unix.AF_INET6}},
		{Flow{Frontend: ap("[::]:30053")}, []uint8{unix.AF_INET6}},
		{Flow{Frontend: port(30053)}, []uint8{unix.AF_INET, unix.AF_INET6}},
	} {
		m, err := newMatcher(tc.flow)
		if err != nil {
			t.Fatal(err)
		}
		if got := m.families(); string(got) != string(tc.want) {
			t.Errorf("%s: families %v, want %v", tc.flow, got, tc.want)
		}
	}
}

func TestFlowString(t *testing.T) {
	for _, tc := range []struct {
		flow Flow
		want string
	}{
		{Flow{ap("10.96.0.10:53"), ap("10.1.0.11:5353")}, "udp dst 10.96.0.10 port 53 to 10.1.0.11 port 5353"},
		{Flow{Frontend: port(30053)}, "udp dst * port 30053"},
		{Flow{ap("[fd00:96::10]:53"), netip.AddrPortFrom(netip.MustParseAddr("fd00:10::11"), 0)}, "udp dst fd00:96::10 port 53 to fd00:10::11"},
	} {
		if got := tc.flow.String(); got != tc.want {
			t.Errorf("String: %q, want %q", got, tc.want)
		}
	}
}

func TestNewBadNetNS(t *testing.T) {
	if _, err := New(WithNetNS("/nonexistent/netns")); err == nil {
		t.Fatal("New with a missing namespace: no error")
	}
}
