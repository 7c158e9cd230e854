package conntrack

import (
	"errors"
	"fmt"
	"net/netip"

	ct "github.com/ti-mo/conntrack"
	"golang.org/x/sys/unix"
)

// matcher is a validated, normalized Flow: what the kernel filter is built
// from and what every entry is checked against before it is deleted. It
// is comparable, so Delete can drop duplicate flows.
type matcher struct {
	flow   Flow       // as given, for messages
	family uint8      // unix.AF_INET or unix.AF_INET6; 0 for both
	dst    netip.Addr // original destination; invalid for any
	port   uint16     // original destination port, never 0
	ep     netip.Addr // reply source; invalid for any
	epPort uint16     // reply source port; 0 for any
}

func newMatcher(f Flow) (matcher, error) {
	m := matcher{flow: f, port: f.Frontend.Port()}
	bad := func(why string) (matcher, error) {
		return matcher{}, fmt.Errorf("conntrack: invalid flow %s: %s", f, why)
	}
	if m.port == 0 {
		return bad("no frontend port")
	}
	if a := f.Frontend.Addr(); a.IsValid() {
		a = a.Unmap().WithZone("")
		m.family = familyOf(a)
		if !a.IsUnspecified() {
			m.dst = a
		}
	}
	if a := f.Endpoint.Addr(); a.IsValid() {
		a = a.Unmap().WithZone("")
		if a.IsUnspecified() {
			return bad("unspecified endpoint address")
		}
		if m.family != 0 && m.family != familyOf(a) {
			return bad("frontend and endpoint of different address families")
		}
		m.family = familyOf(a)
		m.ep = a
		m.epPort = f.Endpoint.Port()
	} else if f.Endpoint.Port() != 0 {
		return bad("endpoint port without endpoint address")
	}
	return m, nil
}

func familyOf(a netip.Addr) uint8 {
	if a.Is4() {
		return unix.AF_INET
	}
	return unix.AF_INET6
}

// families are the address families the matcher's dumps cover.
func (m matcher) families() []uint8 {
	if m.family != 0 {
		return []uint8{m.family}
	}
	return []uint8{unix.AF_INET, unix.AF_INET6}
}

// matches reports whether the entry is one the flow selects. A flow
// without an endpoint selects only entries that were not DNATed (answered
// from the address they were sent to): a datagram sent since the
// frontend got its endpoints made a DNATed entry that is right as it is.
func (m matcher) matches(e entry) bool {
	return e.proto == unix.IPPROTO_UDP &&
		(m.family == 0 || m.family == e.family) &&
		(!m.dst.IsValid() || m.dst == e.origDst) &&
		m.port == e.origDstPort &&
		(!m.ep.IsValid() || m.ep == e.replySrc) &&
		(m.epPort == 0 || m.epPort == e.replySrcPort) &&
		(m.ep.IsValid() || e.replySrc == e.origDst && e.replySrcPort == e.origDstPort)
}

// entry is what Delete needs of a conntrack entry: the fields flows match
// on, the original source for messages and, in key, what identifies it
// for deletion.
type entry struct {
	key          entryKey
	family       uint8
	proto        uint8
	origSrc      netip.AddrPort
	origDst      netip.Addr
	origDstPort  uint16
	replySrc     netip.Addr
	replySrcPort uint16
}

// entryKey identifies an entry for deletion: its reply tuple (with
// zones), which is unique in the table and, unlike the original tuple,
// names the endpoint, so that a later entry from the same client socket
// NATed to another endpoint is a different key; and its ID, which tells
// it from most later entries with the same tuples.
type entryKey struct {
	src, dst         netip.Addr
	srcPort, dstPort uint16
	proto            uint8
	zone, tupleZone  uint16
	id               uint32
}

var errBadEntry = errors.New("entry without a complete original and reply tuple")

func newEntry(f *ct.Flow) (entry, error) {
	o, r := f.TupleOrig, f.TupleReply
	oSrc, oDst := o.IP.SourceAddress.Unmap(), o.IP.DestinationAddress.Unmap()
	rSrc, rDst := r.IP.SourceAddress.Unmap(), r.IP.DestinationAddress.Unmap()
	if !oSrc.IsValid() || !oDst.IsValid() || !rSrc.IsValid() || !rDst.IsValid() ||
		oSrc.Is4() != oDst.Is4() || rSrc.Is4() != rDst.Is4() {
		return entry{}, errBadEntry
	}
	return entry{
		key: entryKey{
			src: rSrc, dst: rDst,
			srcPort: r.Proto.SourcePort, dstPort: r.Proto.DestinationPort,
			proto: r.Proto.Protocol,
			zone:  f.Zone, tupleZone: r.Zone,
			id: f.ID,
		},
		family:       familyOf(oDst),
		proto:        o.Proto.Protocol,
		origSrc:      netip.AddrPortFrom(oSrc, o.Proto.SourcePort),
		origDst:      oDst,
		origDstPort:  o.Proto.DestinationPort,
		replySrc:     rSrc,
		replySrcPort: r.Proto.SourcePort,
	}, nil
}
