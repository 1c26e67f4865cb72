package vmm

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"time"
)

// qmpExecute connects to a QMP socket, negotiates capabilities and runs one command.
func qmpExecute(ctx context.Context, path, command string) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", path)
	if err != nil {
		return fmt.Errorf("qmp %s: %w", command, err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		c.SetDeadline(dl)
	} else {
		c.SetDeadline(time.Now().Add(5 * time.Second))
	}
	r := bufio.NewReader(c)
	// Greeting, then qmp_capabilities, then the command; skip asynchronous events.
	if _, err := r.ReadBytes('\n'); err != nil {
		return fmt.Errorf("qmp greeting: %w", err)
	}
	for _, cmd := range []string{"qmp_capabilities", command} {
		if _, err := fmt.Fprintf(c, `{"execute":%q}`+"\n", cmd); err != nil {
			return fmt.Errorf("qmp %s: %w", cmd, err)
		}
		for {
			line, err := r.ReadBytes('\n')
			if err != nil {
				if cmd == "quit" {
					return nil // QEMU may close before answering
				}
				return fmt.Errorf("qmp %s: %w", cmd, err)
			}
			var m struct {
				Return json.RawMessage `json:"return"`
				Error  *struct {
					Class, Desc string
				} `json:"error"`
			}
			if json.Unmarshal(line, &m) != nil {
				continue
			}
			if m.Error != nil {
				return fmt.Errorf("qmp %s: %s: %s", cmd, m.Error.Class, m.Error.Desc)
			}
			if m.Return != nil {
				break
			}
		}
	}
	return nil
}
