// Package version holds the build's version, set by the linker
// (-ldflags "-X github.com/nftproxy/nftproxy/internal/version.Version=...").
package version

import (
	"fmt"
	"runtime"
	"runtime/debug"
)

// Version is the release or git description of this build; "dev" when the
// build did not set it.
var Version = "dev"

// String describes the build in one line: version, VCS revision when known,
// Go version and platform.
func String() string {
	revision := ""
	if info, ok := debug.ReadBuildInfo(); ok {
		for _, s := range info.Settings {
			if s.Key == "vcs.revision" && len(s.Value) >= 12 {
				revision = " (" + s.Value[:12] + ")"
			}
		}
	}
	return fmt.Sprintf("nftproxy %s%s %s %s/%s", Version, revision, runtime.Version(), runtime.GOOS, runtime.GOARCH)
}
