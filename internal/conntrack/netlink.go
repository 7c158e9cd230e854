package conntrack

import (
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"

	"github.com/mdlayher/netlink"
	ct "github.com/ti-mo/conntrack"
	"github.com/ti-mo/netfilter"
	"golang.org/x/sys/unix"
)

// ctnetlink's message types and attributes, from the kernel's
// include/uapi/linux/netfilter/nfnetlink_conntrack.h (ti-mo/conntrack has
// them too, unexported).
const (
	msgGet    = 1 // IPCTNL_MSG_CT_GET
	msgDelete = 2 // IPCTNL_MSG_CT_DELETE

	attrTupleOrig  = 1  // CTA_TUPLE_ORIG
	attrTupleReply = 2  // CTA_TUPLE_REPLY
	attrID         = 12 // CTA_ID
	attrZone       = 18 // CTA_ZONE
	attrFilter     = 25 // CTA_FILTER

	attrTupleIP    = 1 // CTA_TUPLE_IP
	attrTupleProto = 2 // CTA_TUPLE_PROTO
	attrTupleZone  = 3 // CTA_TUPLE_ZONE

	attrIPv4Src = 1 // CTA_IP_V4_SRC
	attrIPv4Dst = 2 // CTA_IP_V4_DST
	attrIPv6Src = 3 // CTA_IP_V6_SRC
	attrIPv6Dst = 4 // CTA_IP_V6_DST

	attrProtoNum     = 1 // CTA_PROTO_NUM
	attrProtoSrcPort = 2 // CTA_PROTO_SRC_PORT
	attrProtoDstPort = 3 // CTA_PROTO_DST_PORT

	attrFilterOrigFlags  = 1 // CTA_FILTER_ORIG_FLAGS
	attrFilterReplyFlags = 2 // CTA_FILTER_REPLY_FLAGS

	filterIPSrc    = 1 << 0 // CTA_FILTER_F_CTA_IP_SRC
	filterIPDst    = 1 << 1 // CTA_FILTER_F_CTA_IP_DST
	filterProtoNum = 1 << 3 // CTA_FILTER_F_CTA_PROTO_NUM
	filterSrcPort  = 1 << 4 // CTA_FILTER_F_CTA_PROTO_SRC_PORT
	filterDstPort  = 1 << 5 // CTA_FILTER_F_CTA_PROTO_DST_PORT
)

// dumpFiltered lists the entries m selects, with the kernel's tuple
// filter doing most of the selecting. unsupported is true when the kernel
// rejected the filter or ignored it (it returned an entry the filter does
// not select); the caller then falls back to a full dump, so nothing is
// deleted here on the strength of a filter the kernel may not have applied.
func (c *Cleaner) dumpFiltered(m matcher) (entries []entry, unsupported bool, err error) {
	for _, family := range m.families() {
		kf := m.kernelFilter(family)
		req, err := kf.request()
		if err != nil {
			return nil, false, err
		}
		msgs, err := c.conn.Query(req)
		if err != nil {
			if isFilterRejected(err) {
				return nil, true, nil
			}
			return nil, false, err
		}
		es, err := decodeEntries(msgs)
		if err != nil {
			return nil, false, err
		}
		for _, e := range es {
			if !kf.selects(e) {
				return nil, true, nil
			}
			if m.matches(e) {
				entries = append(entries, e)
			}
		}
	}
	return entries, false, nil
}

// kernelFilter is what the kernel is asked to filter a dump on (see
// ctnetlink_filter_match): UDP, the family, the original destination port
// and the reply source port when set, and for IPv4 the original
// destination and reply source addresses when set.
//
// IPv6 addresses are matched in memory only: the kernel's IPv6 address
// comparison in ctnetlink_filter_match_tuple is inverted
// (!ipv6_addr_cmp, since the filter came in Linux 5.10; still so in 6.18,
// checked by TestKernelIPv6AddressFilter), so it would return exactly
// the entries with other addresses and silently miss the right ones.
type kernelFilter struct {
	family  uint8
	dst, ep netip.Addr // IPv4 only; invalid for any
	port    uint16
	epPort  uint16 // 0 for any
}

func (m matcher) kernelFilter(family uint8) kernelFilter {
	kf := kernelFilter{family: family, port: m.port, epPort: m.epPort}
	if family == unix.AF_INET {
		kf.dst, kf.ep = m.dst, m.ep
	}
	return kf
}

// selects reports whether the kernel, applying the filter, may return e.
func (kf kernelFilter) selects(e entry) bool {
	return e.proto == unix.IPPROTO_UDP && e.family == kf.family &&
		e.origDstPort == kf.port &&
		(!kf.dst.IsValid() || kf.dst == e.origDst) &&
		(!kf.ep.IsValid() || kf.ep == e.replySrc) &&
		(kf.epPort == 0 || kf.epPort == e.replySrcPort)
}

// dumpAll lists every entry of the table, IPv4 and IPv6.
func (c *Cleaner) dumpAll() ([]entry, error) {
	req, err := netfilter.MarshalNetlink(netfilter.Header{
		SubsystemID: netfilter.NFSubsysCTNetlink,
		MessageType: msgGet,
		Family:      netfilter.ProtoUnspec,
		Flags:       netlink.Request | netlink.Dump,
	}, nil)
	if err != nil {
		return nil, err
	}
	msgs, err := c.conn.Query(req)
	if err != nil {
		return nil, err
	}
	return decodeEntries(msgs)
}

// deleteEntry deletes the entry with e's reply tuple if it still has e's
// ID. It reports false, and no error, when there is no such entry.
//
// The entry is looked up by its reply tuple, not its original one: when
// the client sends again after the entry went (it expired, or another
// cleanup removed it), the new entry has the same original tuple but, NATed
// to a live endpoint, another reply tuple, and must not be deleted. The
// ID alone would not tell them apart reliably: the kernel derives it from
// the entry's address in memory and its original tuple, and a new entry
// often reuses the memory of the one just freed.
func (c *Cleaner) deleteEntry(e entry) (bool, error) {
	k := e.key
	reply := tupleAttr(attrTupleReply, k.proto,
		[]netfilter.Attribute{ipAttr(true, k.src), ipAttr(false, k.dst)},
		[]netfilter.Attribute{portAttr(attrProtoSrcPort, k.srcPort), portAttr(attrProtoDstPort, k.dstPort)})
	if k.tupleZone != 0 {
		reply.Children = append(reply.Children, netfilter.Attribute{Type: attrTupleZone, Data: netfilter.Uint16Bytes(k.tupleZone)})
	}
	attrs := []netfilter.Attribute{reply, {Type: attrID, Data: netfilter.Uint32Bytes(k.id)}}
	if k.zone != 0 {
		attrs = append(attrs, netfilter.Attribute{Type: attrZone, Data: netfilter.Uint16Bytes(k.zone)})
	}
	req, err := netfilter.MarshalNetlink(netfilter.Header{
		SubsystemID: netfilter.NFSubsysCTNetlink,
		MessageType: msgDelete,
		Family:      netfilter.ProtoFamily(e.family),
		Flags:       netlink.Request | netlink.Acknowledge,
	}, attrs)
	if err != nil {
		return false, err
	}
	if _, err := c.conn.Query(req); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return false, nil
		}
		return false, fmt.Errorf("conntrack: deleting udp %s -> %s reply from %s: %w",
			e.origSrc, netip.AddrPortFrom(e.origDst, e.origDstPort), netip.AddrPortFrom(e.replySrc, e.replySrcPort), err)
	}
	return true, nil
}

// request is a dump of the filter's family filtered by the kernel. The
// filter flags name the tuple fields the kernel compares; each protocol
// part carries the protocol number, which the kernel needs to parse ports.
func (kf kernelFilter) request() (netlink.Message, error) {
	origFlags := uint32(filterProtoNum | filterDstPort)
	var origIPs []netfilter.Attribute
	if kf.dst.IsValid() {
		origFlags |= filterIPDst
		origIPs = append(origIPs, ipAttr(false, kf.dst))
	}
	attrs := []netfilter.Attribute{
		tupleAttr(attrTupleOrig, unix.IPPROTO_UDP, origIPs, []netfilter.Attribute{portAttr(attrProtoDstPort, kf.port)}),
	}
	var replyFlags uint32
	var replyIPs, replyPorts []netfilter.Attribute
	if kf.ep.IsValid() {
		replyFlags |= filterIPSrc
		replyIPs = append(replyIPs, ipAttr(true, kf.ep))
	}
	if kf.epPort != 0 {
		replyFlags |= filterProtoNum | filterSrcPort
		replyPorts = append(replyPorts, portAttr(attrProtoSrcPort, kf.epPort))
	}
	filter := netfilter.Attribute{Type: attrFilter, Nested: true, Children: []netfilter.Attribute{
		{Type: attrFilterOrigFlags, Data: hostUint32(origFlags)},
	}}
	if replyFlags != 0 {
		attrs = append(attrs, tupleAttr(attrTupleReply, unix.IPPROTO_UDP, replyIPs, replyPorts))
		filter.Children = append(filter.Children, netfilter.Attribute{Type: attrFilterReplyFlags, Data: hostUint32(replyFlags)})
	}
	attrs = append(attrs, filter)
	return netfilter.MarshalNetlink(netfilter.Header{
		SubsystemID: netfilter.NFSubsysCTNetlink,
		MessageType: msgGet,
		Family:      netfilter.ProtoFamily(kf.family),
		Flags:       netlink.Request | netlink.Dump,
	}, attrs)
}

// tupleAttr builds a CTA_TUPLE_* attribute: a CTA_TUPLE_IP with ips
// (CTA_IP_* attributes), left out when there are none, and a
// CTA_TUPLE_PROTO with proto and ports (CTA_PROTO_*_PORT attributes).
func tupleAttr(typ uint16, proto uint8, ips, ports []netfilter.Attribute) netfilter.Attribute {
	t := netfilter.Attribute{Type: typ, Nested: true}
	if len(ips) > 0 {
		t.Children = append(t.Children, netfilter.Attribute{Type: attrTupleIP, Nested: true, Children: ips})
	}
	protos := append([]netfilter.Attribute{{Type: attrProtoNum, Data: []byte{proto}}}, ports...)
	t.Children = append(t.Children, netfilter.Attribute{Type: attrTupleProto, Nested: true, Children: protos})
	return t
}

// ipAttr is CTA_IP_V{4,6}_{SRC,DST} for a.
func ipAttr(src bool, a netip.Addr) netfilter.Attribute {
	var typ uint16
	switch {
	case a.Is4() && src:
		typ = attrIPv4Src
	case a.Is4():
		typ = attrIPv4Dst
	case src:
		typ = attrIPv6Src
	default:
		typ = attrIPv6Dst
	}
	return netfilter.Attribute{Type: typ, Data: a.AsSlice()}
}

// portAttr is a port attribute, in network byte order as the kernel
// wants.
func portAttr(typ uint16, port uint16) netfilter.Attribute {
	return netfilter.Attribute{Type: typ, Data: netfilter.Uint16Bytes(port)}
}

// hostUint32 encodes the filter flags, which are NLA_U32 and so, unlike
// the other conntrack attributes, in host byte order.
func hostUint32(v uint32) []byte { return binary.NativeEndian.AppendUint32(nil, v) }

// decodeEntries decodes a dump's messages with ti-mo/conntrack.
func decodeEntries(msgs []netlink.Message) ([]entry, error) {
	entries := make([]entry, 0, len(msgs))
	for _, msg := range msgs {
		var ev ct.Event
		if err := ev.Unmarshal(msg); err != nil {
			return nil, fmt.Errorf("decoding conntrack entry: %w", err)
		}
		if ev.Flow == nil {
			continue
		}
		e, err := newEntry(ev.Flow)
		if err != nil {
			if errors.Is(err, errBadEntry) {
				continue // nothing a Flow could select
			}
			return nil, err
		}
		entries = append(entries, e)
	}
	return entries, nil
}
