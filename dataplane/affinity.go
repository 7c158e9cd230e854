package dataplane

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"syscall"

	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
	"k8s.io/apimachinery/pkg/types"
)

// Session affinity lives in dynamic maps (16 shards per family, picked
// by Service port): (client, frontend) to endpoint. The packet path fills
// them after DNAT, from conntrack (affinity-record in base.go), and a
// Service chain DNATs a client that has an entry to its endpoint. nft
// 1.0.6 can neither parse nor print a rule that compares a map's value or
// looks up a key holding constants, so the packet path cannot tell a
// stale entry (its endpoint is gone) from a live one. The agent removes
// stale entries instead: after a change to a Service with affinity is
// committed (from then on no rule sends a new client to the removed
// endpoint), it reads the maps that Service's chains use and deletes the
// entries whose frontend belongs to a changed Service and whose endpoint
// that frontend's port no longer reaches. A Replace keeps the maps'
// entries (clients stay across an agent restart), then deletes every entry
// the new ruleset does not send its frontend to (fullAffinityCheck).

// affinityEntry is one element of an affinity map as the kernel holds it.
type affinityEntry struct {
	Key      Key // client (Addr), frontend (Addr2, Proto, Port)
	Endpoint netip.AddrPort
}

// frontendKey is a frontend as an affinity entry names it; Addr is not
// valid for a NodePort, which any node address serves.
type frontendKey struct {
	family Family
	addr   netip.Addr
	proto  Protocol
	port   uint16
}

// affinityCheck says which entries of the affinity maps a change made
// stale: those of frontends the changed Services had or have.
type affinityCheck struct {
	// watched are the frontends with affinity before or after the change.
	watched map[frontendKey]bool
	// valid are the endpoints each frontend with affinity reaches now.
	valid map[frontendKey][]netip.AddrPort
	// maps are the affinity maps the changed Services' chains use.
	maps map[string]bool
	// all makes every entry of a frontend not watched stale too: after a
	// Replace, which keeps the maps' entries but not what they were for.
	all bool
}

// fullAffinityCheck finds every entry of every affinity map that rs does
// not send its frontend to: for the entries a replaced table kept, made
// while no agent watched.
func fullAffinityCheck(rs *Ruleset) *affinityCheck {
	c := &affinityCheck{watched: map[frontendKey]bool{}, valid: map[frontendKey][]netip.AddrPort{}, maps: map[string]bool{}, all: true}
	for _, set := range rs.Base.Sets {
		if set.Flags&SetDynamic != 0 {
			c.maps[set.Name] = true
		}
	}
	for _, r := range rs.Services {
		c.watch(r, true)
	}
	return c
}

// newAffinityCheck returns the check for the change from old to cur, nil
// when no Service with affinity changed.
func newAffinityCheck(old, cur *Ruleset) *affinityCheck {
	c := &affinityCheck{watched: map[frontendKey]bool{}, valid: map[frontendKey][]netip.AddrPort{}, maps: map[string]bool{}}
	for _, key := range changedServices(old, cur) {
		if o := old.Services[key]; o != nil {
			c.watch(o, false)
		}
		if n := cur.Services[key]; n != nil {
			c.watch(n, true)
		}
	}
	if len(c.watched) == 0 {
		return nil
	}
	return c
}

func (c *affinityCheck) watch(r *ServiceRules, current bool) {
	for _, ch := range r.Chains {
		for _, rule := range ch.Rules {
			for _, s := range rule.Stmts {
				if d, ok := s.(DNATAffinity); ok {
					c.maps[d.Set] = true
				}
			}
		}
	}
	for _, p := range r.Ports {
		if p.AffinityTimeout == 0 {
			continue
		}
		keys := make([]frontendKey, 0, len(p.Frontends)+1)
		for _, fe := range p.Frontends {
			keys = append(keys, frontendKey{p.Family, fe.Addr(), p.Proto, fe.Port()})
		}
		if p.NodePort != 0 {
			keys = append(keys, frontendKey{family: p.Family, proto: p.Proto, port: p.NodePort})
		}
		for _, k := range keys {
			c.watched[k] = true
			if current {
				c.valid[k] = append(c.valid[k], p.Endpoints...)
			}
		}
	}
}

// stale returns the entries of family f the change made stale, as
// elements to delete (Key only).
func (c *affinityCheck) stale(f Family, entries []affinityEntry) []Element {
	var out []Element
	for _, e := range entries {
		k := frontendKey{f, e.Key.Addr2, e.Key.Proto, e.Key.Port}
		if !c.watched[k] {
			k.addr = netip.Addr{} // a NodePort, on any node address
			if !c.watched[k] {
				if c.all {
					out = append(out, Element{Key: e.Key})
				}
				continue
			}
		}
		if !slices.Contains(c.valid[k], e.Endpoint) {
			out = append(out, Element{Key: e.Key})
		}
	}
	return out
}

// changedServices lists the Services whose rules differ between old and
// cur, at the cost of the changed ones when cur was computed from old.
func changedServices(old, cur *Ruleset) []types.NamespacedName {
	if cur.derivedFrom != 0 && cur.derivedFrom == old.generation {
		return cur.changed
	}
	var out []types.NamespacedName
	for key, o := range old.Services {
		if cur.Services[key] != o {
			out = append(out, key)
		}
	}
	for key := range cur.Services {
		if _, ok := old.Services[key]; !ok {
			out = append(out, key)
		}
	}
	return out
}

// affinityGCAttempts bounds the retries of a delete that lost a race with
// an entry expiring between the read and the delete.
const affinityGCAttempts = 3

// removeStaleAffinity deletes the entries check finds stale, in one
// transaction per attempt.
func (k *KernelApplier) removeStaleAffinity(ctx context.Context, rs *Ruleset, check *affinityCheck) error {
	var err error
	for range affinityGCAttempts {
		b := newBatch(4096, k.seq)
		for _, set := range rs.Base.Sets {
			if !check.maps[set.Name] {
				continue
			}
			f := familyOfKey(set.Key)
			entries, derr := k.dumpAffinity(set)
			if derr != nil {
				return derr
			}
			b.setElements(false, set, check.stale(f, entries))
		}
		if b.messages == 0 {
			return nil
		}
		if err = k.send(ctx, b, false); !errors.Is(err, syscall.ENOENT) {
			return err
		}
	}
	return err
}

// dumpAffinity reads the live entries of an affinity map.
func (k *KernelApplier) dumpAffinity(set *Set) ([]affinityEntry, error) {
	ae := netlink.NewAttributeEncoder()
	ae.String(unix.NFTA_SET_ELEM_LIST_TABLE, TableName)
	ae.String(unix.NFTA_SET_ELEM_LIST_SET, set.Name)
	attrs, err := ae.Encode()
	if err != nil {
		return nil, err
	}
	k.seq++
	seq := k.seq
	req := make([]byte, unix.NLMSG_HDRLEN+4, unix.NLMSG_HDRLEN+4+len(attrs))
	binary.NativeEndian.PutUint32(req[0:], uint32(cap(req)))
	binary.NativeEndian.PutUint16(req[4:], nfnlSubsysNFTables<<8|unix.NFT_MSG_GETSETELEM)
	binary.NativeEndian.PutUint16(req[6:], unix.NLM_F_REQUEST|unix.NLM_F_DUMP)
	binary.NativeEndian.PutUint32(req[8:], seq)
	req[16], req[17] = unix.NFPROTO_INET, unix.NFNETLINK_V0
	req = append(req, attrs...)

	var werr error
	if err := k.raw.Write(func(fd uintptr) bool {
		_, werr = unix.Write(int(fd), req)
		return !errors.Is(werr, unix.EAGAIN)
	}); err != nil || werr != nil {
		return nil, fmt.Errorf("list %s: %w", set.Name, errors.Join(err, werr))
	}
	var out []affinityEntry
	rbuf := make([]byte, 256<<10)
	for {
		var n int
		var rerr error
		if err := k.raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), rbuf, 0)
			return !errors.Is(rerr, unix.EAGAIN)
		}); err != nil || rerr != nil {
			return nil, fmt.Errorf("list %s: %w", set.Name, errors.Join(err, rerr))
		}
		msgs, err := syscall.ParseNetlinkMessage(rbuf[:n])
		if err != nil {
			return nil, fmt.Errorf("list %s: %w", set.Name, err)
		}
		for _, m := range msgs {
			if m.Header.Seq != seq {
				continue // a late reply to something else
			}
			switch m.Header.Type {
			case unix.NLMSG_DONE:
				return out, nil
			case unix.NLMSG_ERROR:
				if len(m.Data) >= 4 {
					if code := -int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
						return nil, fmt.Errorf("list %s: %w", set.Name, syscall.Errno(code))
					}
				}
				return out, nil
			}
			if len(m.Data) < 4 {
				continue
			}
			entries, err := parseAffinityElements(set.Key, m.Data[4:])
			if err != nil {
				return nil, fmt.Errorf("list %s: %w", set.Name, err)
			}
			out = append(out, entries...)
		}
	}
}

// parseAffinityElements decodes the element list of one GETSETELEM reply.
func parseAffinityElements(t KeyType, b []byte) ([]affinityEntry, error) {
	var out []affinityEntry
	ad, err := netlink.NewAttributeDecoder(b)
	if err != nil {
		return nil, err
	}
	for ad.Next() {
		if ad.Type() != unix.NFTA_SET_ELEM_LIST_ELEMENTS {
			continue
		}
		ad.Nested(func(list *netlink.AttributeDecoder) error {
			for list.Next() {
				var key, data []byte
				list.Nested(func(elem *netlink.AttributeDecoder) error {
					for elem.Next() {
						switch elem.Type() {
						case unix.NFTA_SET_ELEM_KEY:
							key = dataValue(elem)
						case unix.NFTA_SET_ELEM_DATA:
							data = dataValue(elem)
						}
					}
					return nil
				})
				if e, ok := decodeAffinityEntry(t, key, data); ok {
					out = append(out, e)
				}
			}
			return nil
		})
	}
	return out, ad.Err()
}

// dataValue returns the NFTA_DATA_VALUE inside the current attribute.
func dataValue(ad *netlink.AttributeDecoder) []byte {
	var v []byte
	ad.Nested(func(d *netlink.AttributeDecoder) error {
		for d.Next() {
			if d.Type() == unix.NFTA_DATA_VALUE {
				v = d.Bytes()
			}
		}
		return nil
	})
	return v
}

// decodeAffinityEntry is encodeKey's inverse for the affinity maps, with
// the endpoint the element maps to.
func decodeAffinityEntry(t KeyType, key, data []byte) (affinityEntry, bool) {
	n := int(addrLen(familyOfKey(t)))
	if len(key) != int(keyLayouts[t].len) || len(data) < n+2 {
		return affinityEntry{}, false
	}
	client, _ := netip.AddrFromSlice(key[:n])
	frontend, _ := netip.AddrFromSlice(key[n : 2*n])
	e := affinityEntry{Key: Key{Addr: client, Addr2: frontend, Proto: Protocol(key[2*n]), Port: binary.BigEndian.Uint16(key[2*n+4:])}}
	ep, _ := netip.AddrFromSlice(data[:n])
	e.Endpoint = netip.AddrPortFrom(ep, binary.BigEndian.Uint16(data[n:]))
	return e, true
}
