package conntrack

import (
	"context"
	"fmt"
	"net/netip"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/nftproxy/nftproxy/internal/netnstest"
)

// benchUnrelated is how many unrelated entries the table holds.
const benchUnrelated = 10000

// BenchmarkDelete times Delete on a table of benchUnrelated unrelated
// UDP entries per family (IPv4 and IPv6, so 2×benchUnrelated in all): a
// tenth of them to port 53 of another Service (which pass the kernel's
// port filter; for IPv6 they are dropped in memory) and the rest to other
// ports. Each op deletes the entries of 10 clients of a removed endpoint
// (one Flow), or of 10 removed endpoints (10 Flows, 1 client each),
// re-created untimed before each op. ns/op is per Delete call.
//
//	go test -run '^$' -bench Delete ./internal/conntrack/
func BenchmarkDelete(b *testing.B) {
	ns := netnstest.New(b, "ctbench")
	conn := dialCT(b, ns)
	for _, f := range families {
		for i := range benchUnrelated {
			client := at(clientAddr(f, i), uint16(10000+i%50000))
			orig, reply := at(f.node, uint16(1000+i%20000)), at(f.live, uint16(1000+i%20000))
			if i%10 == 0 {
				orig, reply = at(f.vip2, 53), at(f.live, 5353)
			}
			create(b, conn, spec{proto: unix.IPPROTO_UDP, client: client, orig: orig, reply: reply})
		}
	}
	for _, f := range families {
		for _, flows := range []int{1, 10} {
			for _, mode := range modes {
				b.Run(fmt.Sprintf("%s/flows=%d/%s", f.name, flows, mode.name), func(b *testing.B) {
					c := newCleaner(b, ns, mode.noKernelFilter)
					var fl []Flow
					var specs []spec
					for j := range flows {
						ep := at(endpointAddr(f, j), 5353)
						fl = append(fl, Flow{Frontend: at(f.vip, 53), Endpoint: ep})
						for k := range 10 / flows {
							specs = append(specs, spec{proto: unix.IPPROTO_UDP, client: at(f.client, uint16(60000+j*10+k)), orig: at(f.vip, 53), reply: ep})
						}
					}
					b.ReportAllocs()
					b.ResetTimer()
					for range b.N {
						b.StopTimer()
						for _, s := range specs {
							create(b, conn, s)
						}
						b.StartTimer()
						n, err := c.Delete(context.Background(), fl)
						if err != nil || n != len(specs) {
							b.Fatalf("Delete = %d, %v; want %d", n, err, len(specs))
						}
					}
				})
			}
		}
	}
}

// clientAddr is the i-th of many client addresses of the family.
func clientAddr(f family, i int) netip.Addr {
	b := f.client.As16()
	b[13], b[14], b[15] = byte(i>>16), byte(i>>8), byte(i)
	a := netip.AddrFrom16(b)
	if f.client.Is4() {
		return a.Unmap()
	}
	return a
}

// endpointAddr is the j-th removed endpoint of the family.
func endpointAddr(f family, j int) netip.Addr {
	b := f.gone.As16()
	b[14] = byte(j + 1) // away from the live endpoint
	a := netip.AddrFrom16(b)
	if f.gone.Is4() {
		return a.Unmap()
	}
	return a
}
