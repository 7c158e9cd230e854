package healthcheck

import "time"

// WithTimeoutForTest shortens the request timeouts so a test can see a slow
// client cut off.
func WithTimeoutForTest(d time.Duration) Option {
	return func(c *config) { c.timeout = d }
}
