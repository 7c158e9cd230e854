package dataplane

import (
	"encoding/binary"
	"encoding/hex"
	"fmt"
	"net/netip"
	"slices"

	"github.com/google/nftables/userdata"
	"golang.org/x/sys/unix"
)

// batch accumulates nf_tables messages into one netlink transaction,
// written straight into a single buffer: at 50,000 Services a cold start
// is about a million messages, so each costs one append, not an
// allocation. Only the last message asks for an acknowledgement; the
// kernel reports every failing message anyway, and a reply per message
// would overflow the socket (which is why this does not go through
// google/nftables' Conn.Flush, which asks for one each).
type batch struct {
	buf      []byte
	firstSeq uint32
	seq      uint32
	setID    uint32
	// ops describes each message by sequence number, for error reports;
	// built from strings the messages hold anyway, so it costs no
	// allocation per message.
	ops      []opDesc
	messages int
	lastMsg  int // offset of the last message's header
	err      error
}

type opDesc struct{ verb, object string }

const (
	nfnlSubsysNFTables = unix.NFNL_SUBSYS_NFTABLES
	// maxElementsPerMessage keeps a set element list under the 64 KiB
	// limit of one netlink attribute.
	maxElementsPerMessage = 256
	// NFTA_TABLE_USERDATA, not in x/sys/unix.
	nftaTableUserdata = 6
)

// newBatch starts a batch whose messages are numbered from firstSeq.
func newBatch(sizeHint int, firstSeq uint32) *batch {
	b := &batch{buf: make([]byte, 0, sizeHint), firstSeq: firstSeq, seq: firstSeq}
	b.begin(unix.NFNL_MSG_BATCH_BEGIN, unix.NLM_F_REQUEST, 0, "begin", "batch")
	b.end()
	return b
}

// begin starts a message; end closes it.
func (b *batch) begin(typ uint16, flags uint16, family byte, verb, object string) {
	b.lastMsg = len(b.buf)
	var hdr [unix.NLMSG_HDRLEN + 4]byte
	binary.NativeEndian.PutUint16(hdr[4:], typ)
	binary.NativeEndian.PutUint16(hdr[6:], flags)
	binary.NativeEndian.PutUint32(hdr[8:], b.seq)
	// nfgenmsg: family, version, resource id (big endian).
	hdr[16] = family
	hdr[17] = unix.NFNETLINK_V0
	binary.BigEndian.PutUint16(hdr[18:], nfnlSubsysNFTables)
	b.buf = append(b.buf, hdr[:]...)
	b.ops = append(b.ops, opDesc{verb, object})
	b.seq++
}

func (b *batch) end() {
	binary.NativeEndian.PutUint32(b.buf[b.lastMsg:], uint32(len(b.buf)-b.lastMsg))
}

func (b *batch) msg(typ uint16, flags uint16, verb, object string) {
	b.messages++
	b.begin(nfnlSubsysNFTables<<8|typ, unix.NLM_F_REQUEST|flags, unix.NFPROTO_INET, verb, object)
}

// op describes the message with sequence number seq.
func (b *batch) op(seq uint32) string {
	if i := seq - b.firstSeq; i < uint32(len(b.ops)) {
		return b.ops[i].verb + " " + b.ops[i].object
	}
	return fmt.Sprintf("message %d", seq)
}

// finish appends the batch end and marks the last message for an
// acknowledgement; it returns the buffer to write and the sequence number
// whose acknowledgement says the kernel has processed the whole batch.
func (b *batch) finish() ([]byte, uint32) {
	last := b.lastMsg
	flags := binary.NativeEndian.Uint16(b.buf[last+6:])
	binary.NativeEndian.PutUint16(b.buf[last+6:], flags|unix.NLM_F_ACK)
	ackSeq := b.seq - 1
	b.begin(unix.NFNL_MSG_BATCH_END, unix.NLM_F_REQUEST, 0, "end", "batch")
	b.end()
	return b.buf, ackSeq
}

// attr appends an attribute with its data, padded to 4 bytes.
func (b *batch) attr(typ uint16, data []byte) {
	var hdr [4]byte
	binary.NativeEndian.PutUint16(hdr[0:], uint16(4+len(data)))
	binary.NativeEndian.PutUint16(hdr[2:], typ)
	b.buf = append(b.buf, hdr[:]...)
	b.buf = append(b.buf, data...)
	b.pad()
}

func (b *batch) pad() {
	for len(b.buf)%4 != 0 {
		b.buf = append(b.buf, 0)
	}
}

func (b *batch) str(typ uint16, s string) {
	var hdr [4]byte
	binary.NativeEndian.PutUint16(hdr[0:], uint16(4+len(s)+1))
	binary.NativeEndian.PutUint16(hdr[2:], typ)
	b.buf = append(b.buf, hdr[:]...)
	b.buf = append(b.buf, s...)
	b.buf = append(b.buf, 0)
	b.pad()
}

func (b *batch) u32(typ uint16, v uint32) {
	var d [4]byte
	binary.BigEndian.PutUint32(d[:], v)
	b.attr(typ, d[:])
}

// nest opens a nested attribute; close it with unnest(offset). Nested
// attributes over 64 KiB cannot be expressed and fail the batch.
func (b *batch) nest(typ uint16) int {
	off := len(b.buf)
	b.buf = append(b.buf, 0, 0, 0, 0)
	binary.NativeEndian.PutUint16(b.buf[off+2:], typ|unix.NLA_F_NESTED)
	return off
}

func (b *batch) unnest(off int) {
	n := len(b.buf) - off
	if n > 0xffff && b.err == nil {
		b.err = fmt.Errorf("netlink attribute of %d bytes is over the 64 KiB limit", n)
	}
	binary.NativeEndian.PutUint16(b.buf[off:], uint16(n))
}

func (b *batch) addTable(comment string) {
	b.msg(unix.NFT_MSG_NEWTABLE, unix.NLM_F_CREATE, "add", "table")
	b.str(unix.NFTA_TABLE_NAME, TableName)
	if comment != "" {
		b.attr(nftaTableUserdata, userdata.AppendString(nil, userdata.TypeComment, comment))
	}
	b.end()
}

func (b *batch) delTable() {
	b.msg(unix.NFT_MSG_DELTABLE, 0, "delete", "table")
	b.str(unix.NFTA_TABLE_NAME, TableName)
	b.end()
}

var hookNums = map[HookPoint]uint32{
	HookPrerouting: unix.NF_INET_PRE_ROUTING, HookInput: unix.NF_INET_LOCAL_IN, HookForward: unix.NF_INET_FORWARD,
	HookOutput: unix.NF_INET_LOCAL_OUT, HookPostrouting: unix.NF_INET_POST_ROUTING,
}

func (b *batch) addChain(c *Chain) {
	b.msg(unix.NFT_MSG_NEWCHAIN, unix.NLM_F_CREATE, "add chain", c.Name)
	b.str(unix.NFTA_CHAIN_TABLE, TableName)
	b.str(unix.NFTA_CHAIN_NAME, c.Name)
	if c.Hook != nil {
		off := b.nest(unix.NFTA_CHAIN_HOOK)
		b.u32(unix.NFTA_HOOK_HOOKNUM, hookNums[c.Hook.Hook])
		b.u32(unix.NFTA_HOOK_PRIORITY, uint32(c.Hook.Priority))
		b.unnest(off)
		b.u32(unix.NFTA_CHAIN_POLICY, 1) // NF_ACCEPT
		b.str(unix.NFTA_CHAIN_TYPE, string(c.Hook.Type))
	}
	b.end()
}

func (b *batch) delChain(name string) {
	b.msg(unix.NFT_MSG_DELCHAIN, 0, "delete chain", name)
	b.str(unix.NFTA_CHAIN_TABLE, TableName)
	b.str(unix.NFTA_CHAIN_NAME, name)
	b.end()
}

// flushChain deletes every rule of a chain.
func (b *batch) flushChain(name string) {
	b.msg(unix.NFT_MSG_DELRULE, 0, "flush chain", name)
	b.str(unix.NFTA_RULE_TABLE, TableName)
	b.str(unix.NFTA_RULE_CHAIN, name)
	b.end()
}

// flushTableRules deletes every rule of every chain in our table.
func (b *batch) flushTableRules() {
	b.msg(unix.NFT_MSG_DELRULE, 0, "flush", "table")
	b.str(unix.NFTA_RULE_TABLE, TableName)
	b.end()
}

func (b *batch) delSet(name string) {
	b.msg(unix.NFT_MSG_DELSET, 0, "delete set", name)
	b.str(unix.NFTA_SET_TABLE, TableName)
	b.str(unix.NFTA_SET_NAME, name)
	b.end()
}

// flushSet deletes every element of a set or map.
func (b *batch) flushSet(name string) {
	b.msg(unix.NFT_MSG_DELSETELEM, 0, "flush set", name)
	b.str(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
	b.str(unix.NFTA_SET_ELEM_LIST_SET, name)
	b.end()
}

// addRules appends a chain's rules.
func (b *batch) addRules(c *Chain) {
	for _, r := range c.Rules {
		b.msg(unix.NFT_MSG_NEWRULE, unix.NLM_F_CREATE|unix.NLM_F_APPEND, "add rule to chain", c.Name)
		b.str(unix.NFTA_RULE_TABLE, TableName)
		b.str(unix.NFTA_RULE_CHAIN, c.Name)
		exprsOff := b.nest(unix.NFTA_RULE_EXPRESSIONS)
		for _, s := range r.Stmts {
			exprs, err := stmtExprs(s)
			if err != nil && b.err == nil {
				b.err = fmt.Errorf("chain %s: %w", c.Name, err)
			}
			for _, e := range exprs {
				data, err := marshalExpr(e)
				if err != nil && b.err == nil {
					b.err = fmt.Errorf("chain %s: %w", c.Name, err)
				}
				off := b.nest(unix.NFTA_LIST_ELEM)
				b.buf = append(b.buf, data...)
				b.pad()
				b.unnest(off)
			}
		}
		b.unnest(exprsOff)
		if r.Comment != "" {
			b.attr(unix.NFTA_RULE_USERDATA, userdata.AppendString(nil, userdata.TypeComment, r.Comment))
		}
		b.end()
	}
}

// Set key layouts: concatenated fields each take a multiple of 4 bytes.
var keyLayouts = map[KeyType]struct {
	typ uint32 // nft datatype id; concatenations pack 6 bits per field
	len uint32
}{
	KeyAddr4:          {7, 4},
	KeyAddr6:          {8, 16},
	KeyAddr4ProtoPort: {7<<12 | 12<<6 | 13, 12},
	KeyAddr6ProtoPort: {8<<12 | 12<<6 | 13, 24},
	KeyProtoPort:      {12<<6 | 13, 8},
	KeyIndex:          {4, 4}, // integer, in host byte order as numgen makes it
	KeyAddr4Pair:      {7<<6 | 7, 8},
	KeyAddr6Pair:      {8<<6 | 8, 32},
	KeyAffinity4:      {7<<18 | 7<<12 | 12<<6 | 13, 16},
	KeyAffinity6:      {8<<18 | 8<<12 | 12<<6 | 13, 40},
	KeyFirewall4:      {7<<18 | 12<<12 | 13<<6 | 7, 16},
	KeyFirewall6:      {8<<18 | 12<<12 | 13<<6 | 8, 40},
}

// intervalFieldLens are the field widths of an interval concatenation,
// which the kernel's pipapo set needs declared (NFTA_SET_DESC_CONCAT).
var intervalFieldLens = map[KeyType][]uint32{
	KeyFirewall4: {4, 1, 2, 4},
	KeyFirewall6: {16, 1, 2, 16},
}

// Netlink attributes of set declarations and elements missing from
// x/sys/unix.
const (
	nftSetConcat         = 0x80 // NFT_SET_CONCAT
	nftaSetDescConcat    = 2    // NFTA_SET_DESC_CONCAT
	nftaSetFieldLen      = 1    // NFTA_SET_FIELD_LEN
	nftaSetElemKeyEnd    = 10   // NFTA_SET_ELEM_KEY_END
	nftaSetDescAttribute = unix.NFTA_SET_DESC
)

// concatUserdata is the set userdata nft 1.0.6 writes for the
// concatenations of the firewall sets (captured with nft --debug=mnl);
// with it nft prints them as it would its own.
var concatUserdata = mustHex("000400000000030800040d0000000100")

// affinityUserdata is what nft 1.0.6 writes for the affinity maps'
// "typeof ip saddr . ip daddr . meta l4proto . th dport : ip daddr . tcp
// dport" (and the ip6 one), captured with nft --debug=mnl.
var affinityUserdata = map[KeyType][]byte{
	KeyAffinity4: mustHex("000400000000010400000000035a00040d00000001520014000407000000010c00040c00000001040b0000000114000407000000010c00040c00000001040c000000020e00040900000001060004100000000314000407000000010c00040b000000010402000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c000408000000010402000000060400000000"),
	KeyAffinity6: mustHex("000400000000010400000000035a00040d00000001520014000407000000010c00040d0000000104080000000114000407000000010c00040d000000010409000000020e00040900000001060004100000000314000407000000010c00040b000000010402000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c000408000000010402000000060400000000"),
}

// Endpoint maps map an index to an address and port.
var dataLayouts = map[DataType]struct{ typ, len uint32 }{
	DataVerdict:   {nftDataVerdict, 0},
	DataEndpoint4: {7<<6 | 13, 8},
	DataEndpoint6: {8<<6 | 13, 20},
}

// endpointMapUserdata is the set userdata nft writes for `typeof numgen
// random mod 1 : ip daddr . tcp dport` (and ip6): with it, nft prints
// the endpoint maps by expression, as their key has no type name of its
// own. Captured from nft 1.0.6.
var endpointMapUserdata = map[DataType][]byte{
	DataEndpoint4: mustHex("000401000000010400000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040c00000001040c0000000114000407000000010c000408000000010402000000060400000000"),
	DataEndpoint6: mustHex("000401000000010400000000031a0004170000000112000401000000010401000000020400000000043400040d000000012c0014000407000000010c00040d0000000104090000000114000407000000010c000408000000010402000000060400000000"),
}

// prefixBound is the first or the last address of a prefix.
func prefixBound(p netip.Prefix, last bool) []byte {
	a := p.Masked().Addr().AsSlice()
	if last {
		for i := p.Bits(); i < len(a)*8; i++ {
			a[i/8] |= 0x80 >> (i % 8)
		}
	}
	return a
}

func mustHex(s string) []byte {
	b, err := hex.DecodeString(s)
	if err != nil {
		panic(err)
	}
	return b
}

const (
	nftDataVerdict = 0xffffff00 // NFT_DATA_VERDICT
	byteOrderBig   = 2          // nft's BYTEORDER_BIG_ENDIAN, in set userdata
	byteOrderHost  = 1
)

func (b *batch) addSet(s *Set) {
	b.msg(unix.NFT_MSG_NEWSET, unix.NLM_F_CREATE, "add set", s.Name)
	b.str(unix.NFTA_SET_TABLE, TableName)
	b.str(unix.NFTA_SET_NAME, s.Name)
	flags := uint32(0)
	if s.Data != DataNone {
		flags |= unix.NFT_SET_MAP
	}
	if s.Flags&SetInterval != 0 {
		flags |= unix.NFT_SET_INTERVAL | nftSetConcat
	}
	if s.Flags&SetDynamic != 0 {
		flags |= unix.NFT_SET_TIMEOUT | unix.NFT_SET_EVAL
	}
	b.u32(unix.NFTA_SET_FLAGS, flags)
	layout := keyLayouts[s.Key]
	b.u32(unix.NFTA_SET_KEY_TYPE, layout.typ)
	b.u32(unix.NFTA_SET_KEY_LEN, layout.len)
	if s.Data != DataNone {
		data := dataLayouts[s.Data]
		b.u32(unix.NFTA_SET_DATA_TYPE, data.typ)
		b.u32(unix.NFTA_SET_DATA_LEN, data.len)
	}
	b.setID++
	b.u32(unix.NFTA_SET_ID, b.setID)
	if lens := intervalFieldLens[s.Key]; s.Flags&SetInterval != 0 && lens != nil {
		desc := b.nest(nftaSetDescAttribute)
		concat := b.nest(nftaSetDescConcat)
		for _, l := range lens {
			field := b.nest(unix.NFTA_LIST_ELEM)
			b.u32(nftaSetFieldLen, l)
			b.unnest(field)
		}
		b.unnest(concat)
		b.unnest(desc)
	}
	if s.Size != 0 {
		desc := b.nest(nftaSetDescAttribute)
		b.u32(unix.NFTA_SET_DESC_SIZE, s.Size)
		b.unnest(desc)
	}
	ud := endpointMapUserdata[s.Data]
	switch s.Key {
	case KeyAffinity4, KeyAffinity6:
		ud = affinityUserdata[s.Key]
	case KeyFirewall4, KeyFirewall6:
		ud = concatUserdata
	}
	if ud == nil {
		ud = userdata.AppendUint32(nil, userdata.NFTNL_UDATA_SET_KEYBYTEORDER, byteOrderBig)
	}
	ud = slices.Clone(ud)
	if s.Comment != "" {
		ud = userdata.AppendString(ud, userdata.NFTNL_UDATA_SET_COMMENT, s.Comment)
	}
	b.attr(unix.NFTA_SET_USERDATA, ud)
	b.end()
}

// setElements adds or deletes elements of one named set or map, as many
// messages as the element count needs.
func (b *batch) setElements(add bool, set *Set, elements []Element) {
	typ, flags, verb := uint16(unix.NFT_MSG_NEWSETELEM), uint16(unix.NLM_F_CREATE), "add elements to"
	if !add {
		typ, flags, verb = unix.NFT_MSG_DELSETELEM, 0, "delete elements from"
	}
	for start := 0; start < len(elements); start += maxElementsPerMessage {
		end := min(start+maxElementsPerMessage, len(elements))
		b.msg(typ, flags, verb, set.Name)
		b.str(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
		b.str(unix.NFTA_SET_ELEM_LIST_SET, set.Name)
		list := b.nest(unix.NFTA_SET_ELEM_LIST_ELEMENTS)
		for _, e := range elements[start:end] {
			b.element(set, e, add)
		}
		b.unnest(list)
		b.end()
	}
}

// element encodes one element; a deletion needs only the key.
func (b *batch) element(set *Set, e Element, add bool) {
	elem := b.nest(unix.NFTA_LIST_ELEM)
	k := b.nest(unix.NFTA_SET_ELEM_KEY)
	b.attr(unix.NFTA_DATA_VALUE, encodeKey(set.Key, e.Key, false))
	b.unnest(k)
	if set.Flags&SetInterval != 0 {
		// Ranges of a concatenation: the first and the last key.
		k := b.nest(nftaSetElemKeyEnd)
		b.attr(unix.NFTA_DATA_VALUE, encodeKey(set.Key, e.Key, true))
		b.unnest(k)
	}
	v, comment := e.Verdict, e.Comment
	switch {
	case !add:
	case set.Data == DataEndpoint4 || set.Data == DataEndpoint6:
		data := b.nest(unix.NFTA_SET_ELEM_DATA)
		port := e.Target.Port()
		b.attr(unix.NFTA_DATA_VALUE, append(e.Target.Addr().AsSlice(), byte(port>>8), byte(port), 0, 0))
		b.unnest(data)
	case set.Data == DataVerdict:
		data := b.nest(unix.NFTA_SET_ELEM_DATA)
		verdict := b.nest(unix.NFTA_DATA_VERDICT)
		b.u32(unix.NFTA_VERDICT_CODE, uint32(int32(verdictExpr(v).Kind)))
		if v.Chain != "" {
			b.str(unix.NFTA_VERDICT_CHAIN, v.Chain)
		}
		b.unnest(verdict)
		b.unnest(data)
	}
	if add && comment != "" {
		b.attr(unix.NFTA_SET_ELEM_USERDATA, userdata.AppendString(nil, userdata.NFTNL_UDATA_SET_ELEM_COMMENT, comment))
	}
	b.unnest(elem)
}

// encodeKey lays a key out as the set's type says; for a range, last
// gives its last key rather than its first.
func encodeKey(t KeyType, k Key, last bool) []byte {
	out := make([]byte, 0, keyLayouts[t].len)
	switch t {
	case KeyAffinity4, KeyAffinity6:
		out = append(append(out, k.Addr.AsSlice()...), k.Addr2.AsSlice()...)
		return append(out, byte(k.Proto), 0, 0, 0, byte(k.Port>>8), byte(k.Port), 0, 0)
	case KeyFirewall4, KeyFirewall6:
		out = append(out, k.Addr.AsSlice()...)
		out = append(out, byte(k.Proto), 0, 0, 0, byte(k.Port>>8), byte(k.Port), 0, 0)
		return append(out, prefixBound(k.Source, last)...)
	case KeyAddr4, KeyAddr6:
		return append(out, k.Addr.AsSlice()...)
	case KeyAddr4Pair, KeyAddr6Pair:
		return append(append(out, k.Addr.AsSlice()...), k.Addr2.AsSlice()...)
	case KeyIndex:
		return binary.NativeEndian.AppendUint32(out, k.Index)
	case KeyAddr4ProtoPort, KeyAddr6ProtoPort:
		out = append(out, k.Addr.AsSlice()...)
	}
	out = append(out, byte(k.Proto), 0, 0, 0)
	return append(out, byte(k.Port>>8), byte(k.Port), 0, 0)
}
