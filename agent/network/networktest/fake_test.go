package networktest

import (
	"testing"

	"github.com/minicloud/minicloud/agent/network"
)

// TestFakeConformance holds the scale fake to the same contract as the
// Linux implementation.
func TestFakeConformance(t *testing.T) {
	RunConformance(t, func(t *testing.T) (network.Manager, func() network.Manager) {
		host := NewFakeHost()
		return NewFakeManager(host), func() network.Manager { return NewFakeManager(host) }
	})
}
