// Package jobstest helps test the CI job runner without booting VMs: AgentMachines gives every
// "VM" a real virtkit-agent serving its exec protocol on a unix socket (the same server that runs
// in a guest), so scripts, output, signals and process groups are real; only the kernel boundary
// is missing. Everything it starts is stopped in t.Cleanup, even when the test fails.
package jobstest

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/ci/jobs"
	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/workers/launcher"
)

// AgentMachines boots "VMs" that are virtkit-agent processes. It is safe for concurrent use.
type AgentMachines struct {
	t     testing.TB
	agent string
	dir   string
	// FailVM makes Boot fail for VMs whose name contains it (a VM that cannot boot).
	FailVM string

	mu    sync.Mutex
	live  map[string]*AgentMachine
	boots int
	hosts map[string]map[string]string
}

// NewAgentMachines builds virtkit-agent and returns machines whose sockets live in a temp folder.
func NewAgentMachines(t testing.TB) *AgentMachines {
	t.Helper()
	d, err := os.MkdirTemp("", "vkjobs-")
	if err != nil {
		t.Fatal(err)
	}
	m := &AgentMachines{t: t, agent: cmdtest.Binary(t, "virtkit-agent"), dir: d, live: map[string]*AgentMachine{}, hosts: map[string]map[string]string{}}
	t.Cleanup(func() {
		m.mu.Lock()
		var all []*AgentMachine
		for _, a := range m.live {
			all = append(all, a)
		}
		m.mu.Unlock()
		for _, a := range all {
			a.Stop(context.Background())
		}
		os.RemoveAll(d)
	})
	return m
}

// Boot implements jobs.Machines.
func (m *AgentMachines) Boot(ctx context.Context, req launcher.Request) (jobs.Machine, error) {
	if m.FailVM != "" && strings.Contains(req.Name, m.FailVM) {
		return nil, fmt.Errorf("agentmachines: %s cannot boot (FailVM)", req.Name)
	}
	sock := filepath.Join(m.dir, req.Name+".sock")
	cmd := exec.Command(m.agent, "serve", "--listen", "unix://"+sock)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	a := &AgentMachine{m: m, name: req.Name, url: "unix://" + sock, cmd: cmd, done: make(chan struct{})}
	go func() { cmd.Wait(); close(a.done) }()
	c, err := client.WaitReady(ctx, a.url)
	if err != nil {
		a.Stop(context.Background())
		return nil, err
	}
	a.agent.Put(c)
	m.mu.Lock()
	if _, dup := m.live[req.Name]; dup {
		m.mu.Unlock()
		a.Stop(context.Background())
		return nil, fmt.Errorf("agentmachines: %s runs already", req.Name)
	}
	m.live[req.Name] = a
	m.boots++
	m.mu.Unlock()
	return a, nil
}

// SetHost implements jobs.Machines: it records the DNS entries a job asked for.
func (m *AgentMachines) SetHost(lan, name, ip string) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.hosts[lan] == nil {
		m.hosts[lan] = map[string]string{}
	}
	m.hosts[lan][name] = ip
}

// Live is the number of machines running.
func (m *AgentMachines) Live() int { m.mu.Lock(); defer m.mu.Unlock(); return len(m.live) }

// Boots is the number of machines booted so far.
func (m *AgentMachines) Boots() int { m.mu.Lock(); defer m.mu.Unlock(); return m.boots }

// AgentMachine is one agent process.
type AgentMachine struct {
	m    *AgentMachines
	name string
	url  string
	cmd  *exec.Cmd
	done chan struct{}
	once sync.Once
	// agent is the boot-time connection until TakeAgent hands it over.
	agent client.Held
}

// TakeAgent hands over the connection that saw the agent answer (nil after the first call), as
// launcher.VM does.
func (a *AgentMachine) TakeAgent() *client.Client { return a.agent.Take() }

func (a *AgentMachine) ExecURL() string       { return a.url }
func (a *AgentMachine) IP() string            { return "" }
func (a *AgentMachine) Done() <-chan struct{} { return a.done }

// Stop kills the agent and every process it started (its process group and the sessions' own
// groups die with their connections).
func (a *AgentMachine) Stop(ctx context.Context) error {
	a.once.Do(func() {
		if c := a.TakeAgent(); c != nil {
			c.Close()
		}
		syscall.Kill(-a.cmd.Process.Pid, syscall.SIGTERM)
		select {
		case <-a.done:
		case <-time.After(5 * time.Second):
			syscall.Kill(-a.cmd.Process.Pid, syscall.SIGKILL)
			<-a.done
		}
		a.m.mu.Lock()
		delete(a.m.live, a.name)
		a.m.mu.Unlock()
	})
	return nil
}
