package jobs

import (
	"context"

	"github.com/virtkit/virtkit/agent/client"

	"github.com/virtkit/virtkit/workers/launcher"
)

// Machine is a booted VM a job uses.
type Machine interface {
	// ExecURL reaches the guest agent.
	ExecURL() string
	// IP is the VM's address on its LAN ("" without network).
	IP() string
	// Done is closed when the VM is gone.
	Done() <-chan struct{}
	// Stop powers the VM off and removes everything it left on the host.
	Stop(ctx context.Context) error
}

// Machines boots VMs for jobs. LauncherMachines is the real one.
type Machines interface {
	Boot(ctx context.Context, req launcher.Request) (Machine, error)
	// SetHost publishes name → ip in LAN lan's DNS (service aliases).
	SetHost(lan, name, ip string)
}

// LauncherMachines boots VMs with a launcher.
type LauncherMachines struct{ L *launcher.Launcher }

// Boot implements Machines.
func (m LauncherMachines) Boot(ctx context.Context, req launcher.Request) (Machine, error) {
	vm, err := m.L.Start(ctx, req)
	if err != nil {
		return nil, err
	}
	return launcherVM{vm}, nil
}

// SetHost implements Machines.
func (m LauncherMachines) SetHost(lan, name, ip string) {
	m.L.SetLANHost(lan, name, ip)
}

type launcherVM struct{ vm *launcher.VM }

func (v launcherVM) ExecURL() string { return v.vm.ExecURL }
func (v launcherVM) IP() string {
	if v.vm.IP.IsValid() {
		return v.vm.IP.String()
	}
	return ""
}
func (v launcherVM) Done() <-chan struct{}          { return v.vm.Done() }
func (v launcherVM) TakeAgent() *client.Client      { return v.vm.TakeAgent() }
func (v launcherVM) Stop(ctx context.Context) error { return v.vm.Stop(ctx) }
