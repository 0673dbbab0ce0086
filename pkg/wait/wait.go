// Package wait holds the one way loops in minicloud pause between tries:
// a sleep that a context ends early.
package wait

import (
	"context"
	"time"
)

// Sleep waits d or until ctx is done, and says whether the wait ran its
// course (false: ctx is done, the caller's loop should end).
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-ctx.Done():
		return false
	case <-t.C:
		return true
	}
}
