package client

import "sync"

// Held keeps a client for one later taker: a VM's boot-time connection to its agent, handed to
// whoever talks to the agent first (saving a dial) or closed at teardown. Safe for concurrent
// use; the zero value holds nothing.
type Held struct {
	mu sync.Mutex
	c  *Client
}

// Put stores c for Take.
func (h *Held) Put(c *Client) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.c = c
}

// Take returns the stored client and forgets it; nil when there is none.
func (h *Held) Take() *Client {
	h.mu.Lock()
	defer h.mu.Unlock()
	c := h.c
	h.c = nil
	return c
}
