package launcher

import (
	"context"
	"errors"
	"fmt"
	"regexp"
	"strconv"
	"sync"
	"time"

	"github.com/rs/zerolog"
	"golang.org/x/sync/errgroup"

	"github.com/virtkit/virtkit/broker"
)

// Work kinds on a host's work subject (broker.HostWorkSubject(host, kind)).
const (
	KindLaunch = "vm.launch"
	KindStop   = "vm.stop"
)

// StopRequest asks the host running VM Name to stop it.
type StopRequest struct {
	Name string `json:"name"`
	// Kill skips the polite power-off.
	Kill bool `json:"kill,omitempty"`
}

// Worker is the launcher as a daemon worker: it boots VMs for vm.launch work (shared, and aimed at
// this host) and stops them for vm.stop work, publishing vm.starting, vm.ready, vm.stopped and
// vm.failed. At start it reconciles leftovers of a crashed predecessor; at shutdown it stops the
// VMs it runs (they cannot outlive the process anyway: their VMMs have a parent-death signal).
type Worker struct {
	l     *Launcher
	c     *broker.Client
	slots *broker.Slots
	log   zerolog.Logger

	mu      sync.Mutex
	running map[string]*VM
	// stopping marks VMs whose end was asked for, so their exit is a stop, not a failure.
	stopping map[string]bool
	// gone holds, for every VM name taken (booting, running or ending), a channel closed once
	// its end is published; launchedBy the id of the work that took it.
	gone       map[string]chan struct{}
	launchedBy map[string]string
	wg         sync.WaitGroup
}

// NewWorker wraps a Launcher for the broker.
func NewWorker(l *Launcher, c *broker.Client, slots *broker.Slots, log zerolog.Logger) *Worker {
	return &Worker{l: l, c: c, slots: slots, log: log, running: map[string]*VM{}, stopping: map[string]bool{},
		gone: map[string]chan struct{}{}, launchedBy: map[string]string{}}
}

// Name implements workers.Worker.
func (w *Worker) Name() string { return "launcher" }

// Running is the number of VMs this worker runs.
func (w *Worker) Running() int { w.mu.Lock(); defer w.mu.Unlock(); return len(w.running) }

// Run implements workers.Worker.
func (w *Worker) Run(ctx context.Context) error {
	left, err := w.l.Reconcile(ctx)
	if err != nil {
		return err
	}
	for _, lo := range left {
		w.log.Warn().Str("vm", lo.Name).Ints("killed", lo.Killed).Msg("reaped a VM left by a previous virtkit")
		w.publish(ctx, &broker.VMStopped{VM: lo.Name, ExitCode: -1, Reason: "reaped: its virtkit process ended"})
	}
	host := w.c.Host()
	w.log.Debug().Str("host", host).Msg("launcher worker taking work")
	g, gctx := errgroup.WithContext(ctx)
	// Each subject gets slots of its own: a waiting fetch holds its slots, and a stop must never
	// queue behind launches. Shared launches honour the host's capacity (w.slots); work aimed at
	// this host was placed here on purpose.
	for subj, slots := range map[string]*broker.Slots{
		broker.HostWorkSubject(host, KindLaunch): broker.NewSlots(4),
		broker.HostWorkSubject(host, KindStop):   broker.NewSlots(16),
		broker.WorkVMLaunch:                      w.slots,
	} {
		g.Go(func() error {
			err := w.c.RunWork(gctx, broker.WorkOptions{Subject: subj, Slots: slots, Log: w.log}, w.handle)
			if err != nil && gctx.Err() == nil {
				w.log.Error().Err(err).Str("subject", subj).Msg("work consumer ended")
			}
			return err
		})
	}
	err = g.Wait()
	// Shutdown: stop what we run, then let the watchers publish.
	w.mu.Lock()
	vms := make([]*VM, 0, len(w.running))
	for name, vm := range w.running {
		w.stopping[name] = true
		vms = append(vms, vm)
	}
	w.mu.Unlock()
	var sg sync.WaitGroup
	for _, vm := range vms {
		sg.Add(1)
		go func() { defer sg.Done(); vm.Stop(context.Background()) }()
	}
	sg.Wait()
	w.wg.Wait()
	if errors.Is(err, context.Canceled) {
		err = nil
	}
	return err
}

func (w *Worker) handle(ctx context.Context, wk *broker.Work) error {
	w.log.Debug().Str("subject", wk.Subject).Str("id", wk.ID).Int("attempt", wk.Attempt).Msg("work")
	switch {
	case wk.Subject == broker.WorkVMLaunch || wk.Subject == broker.HostWorkSubject(w.c.Host(), KindLaunch):
		var req Request
		if err := wk.Decode(&req); err != nil {
			return err
		}
		return w.launch(ctx, req, wk.ID)
	case wk.Subject == broker.HostWorkSubject(w.c.Host(), KindStop):
		var req StopRequest
		if err := wk.Decode(&req); err != nil {
			return err
		}
		return w.stop(ctx, req)
	}
	return broker.Permanent(fmt.Errorf("launcher: unexpected work subject %s", wk.Subject))
}

func (w *Worker) launch(ctx context.Context, req Request, id string) error {
	// A name is taken from the moment its launch starts until its end has been published. A
	// redelivery of the work that took it is done already; a new launch of a name whose VM is
	// ending (it powered off, or a stop is under way) waits for that end to be published, so its
	// own vm.starting comes after the old vm.stopped; a new launch of a name whose VM runs is
	// refused (vm.refused, which leaves the running VM's state alone).
	for {
		w.mu.Lock()
		gone, taken := w.gone[req.Name]
		if !taken {
			w.gone[req.Name] = make(chan struct{})
			w.launchedBy[req.Name] = id
			w.mu.Unlock()
			break
		}
		if w.launchedBy[req.Name] == id {
			w.mu.Unlock()
			return nil // a redelivery of work we did or are doing
		}
		vm := w.running[req.Name]
		ending := w.stopping[req.Name] || (vm != nil && isClosed(vm.Done()))
		w.mu.Unlock()
		if !ending {
			w.log.Warn().Str("vm", req.Name).Msg("launch refused: a VM of that name is running or booting")
			w.publish(ctx, &broker.VMRefused{VM: req.Name, Error: fmt.Sprintf("a VM named %s is already running or booting", req.Name)})
			return nil
		}
		select {
		case <-gone:
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	started := false
	defer func() {
		if !started {
			w.mu.Lock()
			w.release(req.Name)
			w.mu.Unlock()
		}
	}()
	w.publish(ctx, &broker.VMStarting{VM: req.Name, Host: w.c.Host(), Image: req.Rootfs, VMM: firstNonEmpty(req.VMM, w.l.Driver().Name()), CPUs: req.CPUs, MemoryMiB: req.MemoryMiB})
	vm, err := w.l.Start(ctx, req)
	if err != nil {
		w.publish(context.WithoutCancel(ctx), &broker.VMFailed{VM: req.Name, Error: err.Error()})
		return broker.Permanent(err)
	}
	w.mu.Lock()
	w.running[req.Name] = vm
	started = true
	w.mu.Unlock()
	ready := &broker.VMReady{VM: req.Name, BootMillis: vm.Timings.Total.Milliseconds()}
	if vm.IP.IsValid() {
		ready.IP = vm.IP.String()
	}
	w.publish(ctx, ready)
	w.wg.Add(1)
	go w.watch(vm)
	return nil
}

var exitLine = regexp.MustCompile(`virtkit: exit-code (-?\d+)`)

// watch publishes the VM's end: vm.stopped when it was asked to stop or powered itself off,
// vm.failed when its VMM died.
func (w *Worker) watch(vm *VM) {
	defer w.wg.Done()
	<-vm.Done()
	tail := vm.ConsoleTail(40)
	vmmErr := vm.machine.Wait()
	vm.teardown(context.Background())
	w.mu.Lock()
	asked := w.stopping[vm.Name]
	delete(w.running, vm.Name)
	delete(w.stopping, vm.Name)
	w.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	code := -1
	if m := exitLine.FindAllStringSubmatch(tail, -1); m != nil {
		code, _ = strconv.Atoi(m[len(m)-1][1])
	}
	switch {
	case asked:
		w.publish(ctx, &broker.VMStopped{VM: vm.Name, ExitCode: code, Reason: "stopped"})
	case vmmErr != nil:
		w.publish(ctx, &broker.VMFailed{VM: vm.Name, Error: fmt.Sprintf("%v; console:\n%s", vmmErr, tail)})
	default:
		w.publish(ctx, &broker.VMStopped{VM: vm.Name, ExitCode: code, Reason: "powered off"})
	}
	w.mu.Lock()
	w.release(vm.Name)
	w.mu.Unlock()
}

// release frees a VM name once its end is published (or its launch failed); w.mu is held.
func (w *Worker) release(name string) {
	if ch, ok := w.gone[name]; ok {
		close(ch)
		delete(w.gone, name)
		delete(w.launchedBy, name)
	}
}

func isClosed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

func (w *Worker) stop(ctx context.Context, req StopRequest) error {
	w.mu.Lock()
	vm, ok := w.running[req.Name]
	if ok {
		w.stopping[req.Name] = true
	}
	w.mu.Unlock()
	if !ok {
		w.publish(ctx, &broker.VMStopped{VM: req.Name, ExitCode: -1, Reason: "not running"})
		return nil
	}
	if req.Kill {
		vm.machine.Kill()
	} else {
		sctx, cancel := context.WithTimeout(ctx, 15*time.Second)
		vm.PowerOff(sctx)
		cancel()
	}
	return nil // watch publishes vm.stopped
}

func (w *Worker) publish(ctx context.Context, ev broker.Event) {
	if _, err := w.c.Publish(ctx, ev); err != nil {
		w.log.Error().Err(err).Str("event", ev.EventType()).Msg("publish")
	}
}

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}
