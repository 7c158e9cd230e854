package dataplane

import (
	"encoding/binary"
	"fmt"
	"time"

	"github.com/google/nftables/binaryutil"
	"github.com/google/nftables/expr"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Registers as nft allocates them: verdicts in 0, values from 1 (the
// first 16-byte register, which is also the first 32-bit one), further
// fields of a concatenation in the following 32-bit registers.
const (
	regVerdict = 0
	reg1       = 1
	reg2       = 2
	reg32First = 8 // NFT_REG32_00, the same bytes as reg1
)

// Offsets of the address fields in the IPv4 and IPv6 headers.
var addrOffsets = map[Family]map[AddrField]uint32{
	IPv4: {Saddr: 12, Daddr: 16},
	IPv6: {Saddr: 8, Daddr: 24},
}

func addrLen(f Family) uint32 {
	if f == IPv4 {
		return 4
	}
	return 16
}

func nfproto(f Family) byte {
	if f == IPv4 {
		return unix.NFPROTO_IPV4
	}
	return unix.NFPROTO_IPV6
}

// matchFamily is the nfproto guard nft puts before any network header
// access in an inet table.
func matchFamily(f Family) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyNFPROTO, Register: reg1},
		&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{nfproto(f)}},
	}
}

func loadAddr(f Family, field AddrField, reg uint32) expr.Any {
	return &expr.Payload{
		OperationType: expr.PayloadLoad, DestRegister: reg, Base: expr.PayloadBaseNetworkHeader,
		Offset: addrOffsets[f][field], Len: addrLen(f),
	}
}

// loadProtoPort loads meta l4proto and th dport into two registers, the
// consecutive fields of a concatenation key.
func loadProtoPort(protoReg, portReg uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: protoReg},
		&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: portReg, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
	}
}

func cmpOp(negate bool) expr.CmpOp {
	if negate {
		return expr.CmpOpNeq
	}
	return expr.CmpOpEq
}

func verdictExpr(v Verdict) *expr.Verdict {
	kinds := map[VerdictKind]expr.VerdictKind{
		VerdictAccept: expr.VerdictAccept, VerdictDrop: expr.VerdictDrop, VerdictReturn: expr.VerdictReturn,
		VerdictJump: expr.VerdictJump, VerdictGoto: expr.VerdictGoto,
	}
	return &expr.Verdict{Kind: kinds[v.Kind], Chain: v.Chain}
}

// stmtExprs encodes one statement as the expressions nft itself would
// generate for it, so that `nft list` prints our rules back as the text
// in text.go.
// Each element is an expr.Any or a ctLoad.
func stmtExprs(s Stmt) ([]any, error) {
	if out, ok := ctStmtExprs(s); ok {
		return out, nil
	}
	exprs, err := nftExprs(s)
	out := make([]any, len(exprs))
	for i, e := range exprs {
		out[i] = e
	}
	return out, err
}

// ctStmtExprs encodes the statements that read the conntrack entry's
// tuples, which need ct loads with a direction.
func ctStmtExprs(s Stmt) ([]any, bool) {
	switch s := s.(type) {
	case RecordAffinity:
		// The key fills the registers from reg1, the endpoint follows it:
		// ct's original tuple (client, frontend) and reply source (the
		// endpoint, as DNAT made it).
		n := addrLen(s.Family) / 4
		saddr, daddr := ctKeySrcIP, ctKeyDstIP
		if s.Family == IPv6 {
			saddr, daddr = ctKeySrcIP6, ctKeyDstIP6
		}
		daddrReg := reg32First + n
		protoReg := daddrReg + n
		data := protoReg + 2
		return []any{
			ctLoad{key: saddr, dir: ctOriginal, reg: reg1},
			ctLoad{key: daddr, dir: ctOriginal, reg: daddrReg},
			&expr.Ct{Key: expr.CtKeyPROTOCOL, Register: protoReg},
			ctLoad{key: unix.NFT_CT_PROTO_DST, dir: ctOriginal, reg: protoReg + 1},
			ctLoad{key: saddr, dir: ctReply, reg: data},
			ctLoad{key: unix.NFT_CT_PROTO_SRC, dir: ctReply, reg: data + n},
			&expr.Dynset{SrcRegKey: reg1, SrcRegData: data, SetName: s.Set, Operation: unix.NFT_DYNSET_OP_UPDATE,
				Timeout: time.Duration(s.Timeout) * time.Second},
		}, true
	case MatchCtOriginalDaddrSet:
		return []any{ctLoad{key: ctDaddrKey(s.Family), dir: ctOriginal, reg: reg1},
			&expr.Lookup{SourceRegister: reg1, SetName: s.Set}}, true
	case CtFrontendVmap:
		// As loadProtoPort, from the original tuple; after the frontend's
		// address for a key that has one.
		var out []any
		protoReg := uint32(reg32First)
		if s.Key != KeyProtoPort {
			out = append(out, ctLoad{key: ctDaddrKey(s.Family), dir: ctOriginal, reg: reg1})
			protoReg += addrLen(s.Family) / 4
		}
		portReg := protoReg + 1
		if protoReg == reg32First {
			protoReg = reg1 // as nft numbers it
		}
		return append(out,
			&expr.Ct{Key: expr.CtKeyPROTOCOL, Register: protoReg},
			ctLoad{key: unix.NFT_CT_PROTO_DST, dir: ctOriginal, reg: portReg},
			&expr.Lookup{SourceRegister: reg1, DestRegister: regVerdict, IsDestRegSet: true, SetName: s.Map}), true
	}
	return nil, false
}

func nftExprs(s Stmt) ([]expr.Any, error) {
	switch s := s.(type) {
	case MatchCtStateNew:
		return testBits(&expr.Ct{Key: expr.CtKeySTATE, Register: reg1}, expr.CtStateBitNEW, expr.CmpOpNeq), nil
	case MatchCtStatusDNAT:
		return testBits(&expr.Ct{Key: expr.CtKeySTATUS, Register: reg1}, ipsDstNAT, expr.CmpOpNeq), nil
	case MatchAddr:
		f := familyOf(s.Prefix.Addr())
		out := matchFamily(f)
		addr := s.Prefix.Addr().AsSlice()
		bits := s.Prefix.Bits()
		if bits%8 == 0 {
			// Whole bytes: load only the prefix, as nft does.
			out = append(out,
				&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: reg1, Base: expr.PayloadBaseNetworkHeader,
					Offset: addrOffsets[f][s.Field], Len: uint32(bits / 8)},
				&expr.Cmp{Op: cmpOp(s.Negate), Register: reg1, Data: addr[:bits/8]})
			return out, nil
		}
		mask := make([]byte, len(addr))
		for i := range bits {
			mask[i/8] |= 0x80 >> (i % 8)
		}
		out = append(out, loadAddr(f, s.Field, reg1),
			&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: addrLen(f), Mask: mask, Xor: make([]byte, len(addr))},
			&expr.Cmp{Op: cmpOp(s.Negate), Register: reg1, Data: addr})
		return out, nil
	case MatchAddrSet:
		return append(matchFamily(s.Family), loadAddr(s.Family, s.Field, reg1),
			&expr.Lookup{SourceRegister: reg1, SetName: s.Set}), nil
	case MatchIifnamePrefix:
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyIIFNAME, Register: reg1},
			&expr.Cmp{Op: cmpOp(s.Negate), Register: reg1, Data: []byte(s.Prefix)},
		}, nil
	case MatchL4Proto:
		return []expr.Any{
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: reg1},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: []byte{byte(s.Proto)}},
		}, nil
	case MatchMarkUnset:
		return testBits(&expr.Meta{Key: expr.MetaKeyMARK, Register: reg1}, s.Mask, expr.CmpOpEq), nil
	case VmapLookup:
		var out []expr.Any
		switch s.Key {
		case KeyAddr4ProtoPort, KeyAddr6ProtoPort:
			f := IPv4
			if s.Key == KeyAddr6ProtoPort {
				f = IPv6
			}
			out = append(matchFamily(f), loadAddr(f, Daddr, reg1))
			next := reg32First + addrLen(f)/4
			out = append(out, loadProtoPort(next, next+1)...)
		case KeyProtoPort:
			out = loadProtoPort(reg1, reg32First+1)
		default:
			return nil, fmt.Errorf("vmap lookup with key type %d", s.Key)
		}
		return append(out, &expr.Lookup{SourceRegister: reg1, DestRegister: regVerdict, IsDestRegSet: true, SetName: s.Map}), nil
	case MatchAddrPairSet:
		return append(matchFamily(s.Family), loadAddr(s.Family, Saddr, reg1),
			loadAddr(s.Family, Daddr, reg32First+addrLen(s.Family)/4),
			&expr.Lookup{SourceRegister: reg1, SetName: s.Set}), nil
	case MatchFibSaddrLocal:
		return []expr.Any{
			&expr.Fib{Register: reg1, FlagSADDR: true, ResultADDRTYPE: true},
			&expr.Cmp{Op: expr.CmpOpEq, Register: reg1, Data: binaryutil.NativeEndian.PutUint32(unix.RTN_LOCAL)},
		}, nil
	case MatchFrontendSet:
		out := append(matchFamily(s.Family), loadAddr(s.Family, Daddr, reg1))
		next := reg32First + addrLen(s.Family)/4
		out = append(out, loadProtoPort(next, next+1)...)
		return append(out, &expr.Lookup{SourceRegister: reg1, SetName: s.Set}), nil
	case MatchFirewallAllowed:
		// As nft writes an interval concatenation: the one-byte protocol
		// goes through a (no-op) byteorder conversion.
		out := append(matchFamily(s.Family), loadAddr(s.Family, Daddr, reg1))
		next := reg32First + addrLen(s.Family)/4
		out = append(out,
			&expr.Meta{Key: expr.MetaKeyL4PROTO, Register: next},
			&expr.Byteorder{SourceRegister: next, DestRegister: next, Op: expr.ByteorderHton, Len: 1, Size: 2},
			&expr.Payload{OperationType: expr.PayloadLoad, DestRegister: next + 1, Base: expr.PayloadBaseTransportHeader, Offset: 2, Len: 2},
			loadAddr(s.Family, Saddr, next+2),
			&expr.Lookup{SourceRegister: reg1, SetName: s.Set, Invert: s.Negate})
		return out, nil
	case DNATAffinity:
		key, _ := affinityKey(s.Family)
		return append(key,
			&expr.Lookup{SourceRegister: reg1, DestRegister: reg1, IsDestRegSet: true, SetName: s.Set},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(nfproto(s.Family)), RegAddrMin: reg1,
				RegProtoMin: reg32First + addrLen(s.Family)/4}), nil
	case DNATRandom:
		// The map's value is address then port, so the port lands in the
		// 32-bit register after the address.
		return []expr.Any{
			&expr.Numgen{Register: reg1, Modulus: s.Count, Offset: s.Offset, Type: unix.NFT_NG_RANDOM},
			&expr.Lookup{SourceRegister: reg1, DestRegister: reg1, IsDestRegSet: true, SetName: s.Map},
			&expr.NAT{Type: expr.NATTypeDestNAT, Family: uint32(nfproto(s.Family)), RegAddrMin: reg1,
				RegProtoMin: reg32First + addrLen(s.Family)/4},
		}, nil
	case SetMarkBits:
		return markExprs(^s.Bits, s.Bits), nil
	case ClearMarkBits:
		return markExprs(0xffffffff, s.Bits), nil
	case Masquerade:
		return []expr.Any{&expr.Masq{FullyRandom: true}}, nil
	case Reject:
		if s.TCPReset {
			return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_TCP_RST}}, nil
		}
		return []expr.Any{&expr.Reject{Type: unix.NFT_REJECT_ICMPX_UNREACH, Code: unix.NFT_REJECT_ICMPX_PORT_UNREACH}}, nil
	case VerdictStmt:
		return []expr.Any{verdictExpr(s.Verdict)}, nil
	}
	return nil, fmt.Errorf("unknown statement %T", s)
}

// Conntrack keys and directions google/nftables does not encode as nft
// does: its Ct sends a direction only for the generic address keys, as a
// 32-bit value where the kernel reads one byte.
const (
	ctKeySrcIP  uint32 = unix.NFT_CT_SRC_IP
	ctKeyDstIP  uint32 = unix.NFT_CT_DST_IP
	ctKeySrcIP6 uint32 = unix.NFT_CT_SRC_IP6
	ctKeyDstIP6 uint32 = unix.NFT_CT_DST_IP6
	ctOriginal  uint32 = 0 // IP_CT_DIR_ORIGINAL
	ctReply     uint32 = 1 // IP_CT_DIR_REPLY
	// ipsDstNAT is IPS_DST_NAT of the ct status bits.
	ipsDstNAT = 1 << 5
)

func ctDaddrKey(f Family) uint32 {
	if f == IPv6 {
		return ctKeyDstIP6
	}
	return ctKeyDstIP
}

// ctLoad loads a field of one direction of the packet's conntrack entry
// into a register, encoded as libnftnl does.
type ctLoad struct{ key, dir, reg uint32 }

func (c ctLoad) marshal() ([]byte, error) {
	ae := netlink.NewAttributeEncoder()
	ae.ByteOrder = binary.BigEndian
	ae.Uint32(unix.NFTA_CT_KEY, c.key)
	ae.Uint32(unix.NFTA_CT_DREG, c.reg)
	ae.Uint8(unix.NFTA_CT_DIRECTION, uint8(c.dir))
	data, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	return netlink.MarshalAttributes([]netlink.Attribute{
		{Type: unix.NFTA_EXPR_NAME, Data: []byte("ct\x00")},
		{Type: unix.NLA_F_NESTED | unix.NFTA_EXPR_DATA, Data: data},
	})
}

// marshalExpr encodes one element of stmtExprs' result.
func marshalExpr(e any) ([]byte, error) {
	switch e := e.(type) {
	case ctLoad:
		return e.marshal()
	case expr.Any:
		return expr.Marshal(unix.NFPROTO_INET, e)
	}
	return nil, fmt.Errorf("unknown expression %T", e)
}

// affinityKey loads the key of the affinity maps into consecutive
// registers from reg1: client address, destination address (the
// frontend, before DNAT), l4 protocol, destination port. It returns the
// first register after the key.
func affinityKey(f Family) ([]expr.Any, uint32) {
	daddr := reg32First + addrLen(f)/4
	proto := daddr + addrLen(f)/4
	out := append(matchFamily(f), loadAddr(f, Saddr, reg1), loadAddr(f, Daddr, daddr))
	return append(out, loadProtoPort(proto, proto+1)...), proto + 2
}

// testBits loads a 32-bit value into reg1 and compares its mask bits with
// zero: CmpOpNeq matches when any is set, CmpOpEq when none is.
func testBits(load expr.Any, mask uint32, op expr.CmpOp) []expr.Any {
	return []expr.Any{
		load,
		&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(mask), Xor: make([]byte, 4)},
		&expr.Cmp{Op: op, Register: reg1, Data: make([]byte, 4)},
	}
}

// markExprs sets mark = (mark & and) ^ xor.
func markExprs(and, xor uint32) []expr.Any {
	return []expr.Any{
		&expr.Meta{Key: expr.MetaKeyMARK, Register: reg1},
		&expr.Bitwise{SourceRegister: reg1, DestRegister: reg1, Len: 4,
			Mask: binaryutil.NativeEndian.PutUint32(and), Xor: binaryutil.NativeEndian.PutUint32(xor)},
		&expr.Meta{Key: expr.MetaKeyMARK, SourceRegister: true, Register: reg1},
	}
}
