package launcher

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Leftover is a VM folder whose owner is gone, found by Reconcile.
type Leftover struct {
	Name   string
	Killed []int // processes that were still alive and were killed
}

// Reconcile reaps what a crashed or SIGKILLed virtkit left behind: every VM folder under the state
// dir that this Launcher did not start. Processes named in its pid files are killed when they still
// run with the folder on their command line (so a recycled pid is never hit), then the folder is
// removed. The caller turns the result into vm.stopped events.
func (l *Launcher) Reconcile(ctx context.Context) ([]Leftover, error) {
	root := filepath.Join(l.cfg.StateDir, "vms")
	ents, err := os.ReadDir(root)
	if os.IsNotExist(err) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("launcher: reconcile: %w", err)
	}
	var out []Leftover
	for _, e := range ents {
		if !e.IsDir() {
			continue
		}
		l.mu.Lock()
		_, live := l.vms[e.Name()]
		l.mu.Unlock()
		if live {
			continue
		}
		dir := filepath.Join(root, e.Name())
		lo := Leftover{Name: e.Name()}
		pids, _ := filepath.Glob(filepath.Join(dir, "*.pid"))
		for _, pf := range pids {
			b, err := os.ReadFile(pf)
			if err != nil {
				continue
			}
			pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil || pid <= 1 {
				continue
			}
			if ownedBy(pid, dir) {
				syscall.Kill(-pid, syscall.SIGKILL)
				syscall.Kill(pid, syscall.SIGKILL)
				lo.Killed = append(lo.Killed, pid)
			}
		}
		for _, pid := range lo.Killed {
			waitGone(ctx, pid)
		}
		if err := os.RemoveAll(dir); err != nil {
			return out, fmt.Errorf("launcher: reconcile %s: %w", dir, err)
		}
		out = append(out, lo)
	}
	return out, nil
}

// ownedBy reports whether pid runs with dir on its command line.
func ownedBy(pid int, dir string) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && bytes.Contains(b, []byte(dir+"/"))
}

func waitGone(ctx context.Context, pid int) {
	for i := 0; i < 200; i++ {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); os.IsNotExist(err) {
			return
		}
		// A zombie of ours is gone for our purposes once killed.
		if b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil {
			if f := strings.Fields(string(b)); len(f) > 2 && f[2] == "Z" {
				return
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(10 * time.Millisecond):
		}
	}
}
