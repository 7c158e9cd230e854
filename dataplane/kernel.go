package dataplane

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"syscall"
	"time"

	"github.com/google/nftables"
	"github.com/mdlayher/netlink"
	"golang.org/x/sys/unix"
)

// Applier writes rulesets to a dataplane. The syncer depends on this
// interface; KernelApplier is the real one.
type Applier interface {
	// Apply makes the dataplane match rs, atomically: after an error the
	// dataplane still holds what it held before.
	Apply(ctx context.Context, rs *Ruleset) error
	// Cleanup removes everything the applier ever wrote.
	Cleanup(ctx context.Context) error
}

// BatchStats describes the last transaction an applier wrote.
type BatchStats struct {
	Full     bool // a replace of the whole table rather than a diff
	Messages int
	Bytes    int
}

// KernelApplier programs our nftables table over netlink. It remembers
// what it last applied and sends only the difference. It reads the kernel
// only to name the chains and sets of its table when it replaces it, and,
// after a change to a Service with session affinity, to find the entries
// of the affinity maps that point at removed endpoints. The first Apply,
// and the first after a failed one, replaces the whole table in one
// transaction, so taking over from a previous agent (or repairing a table
// someone edited) leaves no moment without rules. It is not safe for
// concurrent use.
type KernelApplier struct {
	conn    *netlink.Conn
	netns   string // the namespace programmed; "" for the caller's
	raw     syscall.RawConn
	applied *Ruleset
	seq     uint32
	sndbuf  int
	last    BatchStats
}

// KernelOption configures a KernelApplier.
type KernelOption func(*kernelOptions)

type kernelOptions struct{ netns string }

// WithNetNS makes the applier program the network namespace at path (for
// example /run/netns/NAME) instead of the caller's.
func WithNetNS(path string) KernelOption {
	return func(o *kernelOptions) { o.netns = path }
}

// NewKernelApplier opens a netlink socket to nf_tables.
func NewKernelApplier(opts ...KernelOption) (*KernelApplier, error) {
	var o kernelOptions
	for _, opt := range opts {
		opt(&o)
	}
	cfg := &netlink.Config{}
	if o.netns != "" {
		f, err := os.Open(o.netns)
		if err != nil {
			return nil, fmt.Errorf("open network namespace: %w", err)
		}
		defer func() { _ = f.Close() }()
		cfg.NetNS = int(f.Fd())
	}
	conn, err := netlink.Dial(unix.NETLINK_NETFILTER, cfg)
	if err != nil {
		return nil, fmt.Errorf("open nf_tables netlink socket: %w", err)
	}
	raw, err := conn.SyscallConn()
	if err != nil {
		_ = conn.Close()
		return nil, fmt.Errorf("nf_tables netlink socket: %w", err)
	}
	k := &KernelApplier{conn: conn, raw: raw, netns: o.netns, seq: uint32(time.Now().UnixNano())}
	// Errors carry only the failing message's header, not its payload, so
	// one reply stays small.
	if err := k.setsockopt(unix.SOL_NETLINK, unix.NETLINK_CAP_ACK, 1); err != nil {
		_ = conn.Close()
		return nil, err
	}
	return k, nil
}

// Close closes the netlink socket; the table stays in the kernel.
func (k *KernelApplier) Close() error { return k.conn.Close() }

// LastBatch describes the last transaction written.
func (k *KernelApplier) LastBatch() BatchStats { return k.last }

// Apply writes the difference between the last applied ruleset and rs, or
// replaces the table when there is no (trusted) last one.
func (k *KernelApplier) Apply(ctx context.Context, rs *Ruleset) error {
	if k.applied != nil {
		c, ok := diff(k.applied, rs)
		if ok {
			if c.empty() {
				k.last = BatchStats{}
				return nil
			}
			b := newBatch(4096, k.seq)
			writeChanges(b, c, rs.Base.Sets)
			if err := k.send(ctx, b, false); err != nil {
				k.applied = nil
				return err
			}
			if check := newAffinityCheck(k.applied, rs); check != nil {
				if err := k.removeStaleAffinity(ctx, rs, check); err != nil {
					// The next Apply replaces the table, affinity maps
					// and all, rather than leave stale entries.
					k.applied = nil
					return fmt.Errorf("remove stale session affinity entries: %w", err)
				}
			}
			k.applied = rs
			return nil
		}
	}
	return k.Replace(ctx, rs)
}

// Replace swaps the kernel's table for rs in one transaction, whatever the
// kernel had. It lists the names of the table's chains and sets first (the
// only time the applier reads the kernel), to rewrite the table in place;
// when that fails it rebuilds the table from nothing.
func (k *KernelApplier) Replace(ctx context.Context, rs *Ruleset) error {
	k.applied = nil
	found, err := k.listTable()
	if err == nil {
		b := newBatch(estimateSize(rs), k.seq)
		writeReplace(b, rs, found.staleFor(rs))
		if err = k.send(ctx, b, true); err == nil {
			if err := k.removeStaleAffinity(ctx, rs, fullAffinityCheck(rs)); err != nil {
				return fmt.Errorf("remove stale session affinity entries: %w", err)
			}
			k.applied = rs
			return nil
		}
	}
	b := newBatch(estimateSize(rs), k.seq)
	writeRebuild(b, rs)
	if rerr := k.send(ctx, b, true); rerr != nil {
		return fmt.Errorf("rebuilding the table (rewriting it in place failed: %w): %w", err, rerr)
	}
	k.applied = rs
	return nil
}

// listTable names the chains and sets of our table in the kernel; none
// when there is no table.
func (k *KernelApplier) listTable() (kernelObjects, error) {
	var opts []nftables.ConnOption
	if k.netns != "" {
		f, err := os.Open(k.netns)
		if err != nil {
			return kernelObjects{}, fmt.Errorf("open network namespace: %w", err)
		}
		defer func() { _ = f.Close() }()
		opts = append(opts, nftables.WithNetNSFd(int(f.Fd())))
	}
	conn, err := nftables.New(opts...)
	if err != nil {
		return kernelObjects{}, err
	}
	table, err := conn.ListTableOfFamily(TableName, nftables.TableFamilyINet)
	if errors.Is(err, unix.ENOENT) {
		return kernelObjects{}, nil
	}
	if err != nil {
		return kernelObjects{}, fmt.Errorf("list table: %w", err)
	}
	chains, err := conn.ListChainsOfTableFamily(nftables.TableFamilyINet)
	if err != nil {
		return kernelObjects{}, fmt.Errorf("list chains: %w", err)
	}
	sets, err := conn.GetSets(table)
	if err != nil {
		return kernelObjects{}, fmt.Errorf("list sets: %w", err)
	}
	var found kernelObjects
	for _, c := range chains {
		if c.Table.Name == TableName {
			found.chains = append(found.chains, c.Name)
		}
	}
	for _, s := range sets {
		if !s.Anonymous {
			found.sets = append(found.sets, s.Name)
		}
	}
	return found, nil
}

// staleFor is what of found rs does not have.
func (found kernelObjects) staleFor(rs *Ruleset) kernelObjects {
	wanted := map[string]bool{}
	for _, c := range allChains(rs) {
		wanted[c.Name] = true
	}
	var stale kernelObjects
	for _, name := range found.chains {
		if !wanted[name] {
			stale.chains = append(stale.chains, name)
		}
	}
	clear(wanted)
	for _, s := range rs.Base.Sets {
		wanted[s.Name] = true
	}
	for _, name := range found.sets {
		if !wanted[name] {
			stale.sets = append(stale.sets, name)
		}
	}
	return stale
}

// Cleanup deletes our table, if there is one, and nothing else.
func (k *KernelApplier) Cleanup(ctx context.Context) error {
	k.applied = nil
	b := newBatch(256, k.seq)
	b.addTable("")
	b.delTable()
	return k.send(ctx, b, true)
}

// estimateSize guesses a replace's batch size, to allocate it once: about
// 0.8 KiB per Service measured for the core mix and 1.7 KiB with the
// policies, so 1.5 KiB rarely grows and never doubles the heap.
func estimateSize(rs *Ruleset) int {
	return 64<<10 + len(rs.Services)*1536
}

// send writes one transaction and waits for the kernel's verdict on it.
func (k *KernelApplier) send(ctx context.Context, b *batch, full bool) error {
	if b.err != nil {
		return b.err
	}
	buf, ackSeq := b.finish()
	k.seq = b.seq
	k.last = BatchStats{Full: full, Messages: b.messages, Bytes: len(buf)}

	// The kernel takes a batch only whole, in one write, so the send
	// buffer must hold it (root may raise it past net.core.wmem_max).
	if need := len(buf) + 64<<10; need > k.sndbuf {
		if err := k.setsockopt(unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, need); err != nil {
			return err
		}
		k.sndbuf = need
	}
	deadline := time.Now().Add(2 * time.Minute)
	if d, ok := ctx.Deadline(); ok && d.Before(deadline) {
		deadline = d
	}
	if err := k.conn.SetDeadline(deadline); err != nil {
		return err
	}
	var werr error
	if err := k.raw.Write(func(fd uintptr) bool {
		_, werr = unix.Write(int(fd), buf)
		return !errors.Is(werr, unix.EAGAIN)
	}); err != nil {
		return fmt.Errorf("write nf_tables batch: %w", err)
	}
	if werr != nil {
		return fmt.Errorf("write nf_tables batch of %d bytes: %w", len(buf), werr)
	}
	return k.awaitAck(b, ackSeq)
}

// awaitAck reads replies until the acknowledgement of the batch's last
// message, collecting the errors the kernel reported on the way.
func (k *KernelApplier) awaitAck(b *batch, ackSeq uint32) error {
	rbuf := make([]byte, 64<<10)
	var errs []error
	for {
		var n int
		var rerr error
		if err := k.raw.Read(func(fd uintptr) bool {
			n, _, rerr = unix.Recvfrom(int(fd), rbuf, 0)
			return !errors.Is(rerr, unix.EAGAIN)
		}); err != nil {
			return fmt.Errorf("read nf_tables reply: %w", err)
		}
		if rerr != nil {
			return fmt.Errorf("read nf_tables reply: %w", rerr)
		}
		msgs, err := syscall.ParseNetlinkMessage(rbuf[:n])
		if err != nil {
			return fmt.Errorf("parse nf_tables reply: %w", err)
		}
		for _, m := range msgs {
			if m.Header.Type != unix.NLMSG_ERROR || len(m.Data) < 4 {
				continue
			}
			if code := -int32(binary.NativeEndian.Uint32(m.Data)); code != 0 {
				errs = append(errs, fmt.Errorf("%s: %w", b.op(m.Header.Seq), syscall.Errno(code)))
			}
			if m.Header.Seq == ackSeq {
				if len(errs) > 0 {
					return fmt.Errorf("nf_tables rejected the transaction (nothing was changed): %w", errors.Join(errs...))
				}
				return nil
			}
		}
	}
}

func (k *KernelApplier) setsockopt(level, opt, value int) error {
	var serr error
	if err := k.raw.Control(func(fd uintptr) {
		serr = unix.SetsockoptInt(int(fd), level, opt, value)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("setsockopt %d/%d: %w", level, opt, serr)
	}
	return nil
}
