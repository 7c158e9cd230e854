package agent

import (
	"net"

	"github.com/nftproxy/nftproxy/internal/netns"
)

// listenInNetNS returns a listen function whose sockets live in the
// network namespace pinned at path.
func listenInNetNS(path string) func(network, address string) (net.Listener, error) {
	return func(network, address string) (net.Listener, error) {
		var l net.Listener
		err := netns.Do(path, func() error {
			var err error
			l, err = net.Listen(network, address)
			return err
		})
		return l, err
	}
}
