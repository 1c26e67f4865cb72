package vmm

import (
	"os"
	"os/exec"
	"runtime"
	"sync"
	"syscall"
)

// Processes are started from one OS thread that never exits: Linux delivers the parent-death signal
// when the *thread* that forked dies, and Go may retire ordinary threads at any time.
var spawner struct {
	once sync.Once
	reqs chan spawnReq
}

type spawnReq struct {
	cmd  *exec.Cmd
	errc chan error
}

// startChild starts cmd in its own process group with SIGKILL as its parent-death signal.
func startChild(cmd *exec.Cmd) error {
	spawner.once.Do(func() {
		spawner.reqs = make(chan spawnReq)
		go func() {
			runtime.LockOSThread() // never unlocked: this thread lives as long as the process
			for r := range spawner.reqs {
				r.errc <- r.cmd.Start()
			}
		}()
	})
	if cmd.SysProcAttr == nil {
		cmd.SysProcAttr = &syscall.SysProcAttr{}
	}
	cmd.SysProcAttr.Setpgid = true
	cmd.SysProcAttr.Pdeathsig = syscall.SIGKILL
	errc := make(chan error, 1)
	spawner.reqs <- spawnReq{cmd, errc}
	if err := <-errc; err != nil {
		return err
	}
	// If we died between fork and prctl, the child missed the signal: it sees a new parent.
	if os.Getppid() == 1 {
		cmd.Process.Kill()
	}
	return nil
}

// StartChild is startChild for other launcher parts (vhost-user helpers): the child dies with us.
func StartChild(cmd *exec.Cmd) error { return startChild(cmd) }
