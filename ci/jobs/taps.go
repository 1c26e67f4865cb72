package jobs

import (
	"fmt"
	"regexp"
	"slices"
	"strings"
	"sync"
)

// TapPool hands out an operator's pre-created tap devices (net.mode = "pool"), one per job VM:
// a tap is leased by one job at a time and comes back when that job is torn down. It is safe for
// concurrent use.
type TapPool struct {
	mu     sync.Mutex
	taps   []string          // in the configured order
	leased map[string]string // tap → job
}

var tapName = regexp.MustCompile(`^[A-Za-z0-9_.-]{1,15}$`)

// NewTapPool returns a pool of the named taps. Names must be Linux interface names (1-15 of
// letters, digits, '_', '.', '-') and distinct.
func NewTapPool(taps []string) (*TapPool, error) {
	if len(taps) == 0 {
		return nil, fmt.Errorf(`jobs: tap pool: no taps (net.taps lists the pre-created taps of net.mode = "pool")`)
	}
	for i, t := range taps {
		if !tapName.MatchString(t) || t == "." || t == ".." {
			return nil, fmt.Errorf("jobs: tap pool: %q is not an interface name (1-15 of A-Z, a-z, 0-9, '_', '.', '-')", t)
		}
		if slices.Contains(taps[:i], t) {
			return nil, fmt.Errorf("jobs: tap pool: %s listed twice", t)
		}
	}
	return &TapPool{taps: slices.Clone(taps), leased: map[string]string{}}, nil
}

// Lease gives job a free tap, or an error naming the pool when every tap is leased.
func (p *TapPool) Lease(job string) (string, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, t := range p.taps {
		if _, busy := p.leased[t]; !busy {
			p.leased[t] = job
			return t, nil
		}
	}
	return "", fmt.Errorf("no free tap: all %d taps of the pool (%s) are leased by running jobs; add taps to net.taps or lower vm.capacity", len(p.taps), strings.Join(p.taps, ", "))
}

// Return gives tap back to the pool.
func (p *TapPool) Return(tap string) {
	p.mu.Lock()
	defer p.mu.Unlock()
	delete(p.leased, tap)
}

// Leased returns tap → job for the taps in use.
func (p *TapPool) Leased() map[string]string {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := make(map[string]string, len(p.leased))
	for t, j := range p.leased {
		out[t] = j
	}
	return out
}

// Size is the number of taps in the pool.
func (p *TapPool) Size() int { return len(p.taps) }
