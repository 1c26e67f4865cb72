package jobs

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/nats-io/nats.go"
	"github.com/nats-io/nats.go/jetstream"
	"github.com/rs/zerolog"

	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/imaging/store"
	"github.com/virtkit/virtkit/workers/launcher"
)

// Config configures a Runner. Client, Slots, Machines and Images are required.
type Config struct {
	Client   *broker.Client
	Slots    *broker.Slots
	Machines Machines
	Images   Images
	// JobTimeout bounds a job that names none (and caps one that does); default 1 hour.
	JobTimeout time.Duration
	// CPUs and MemoryMiB are a job's defaults; MaxCPUs and MaxMemoryMiB cap what it may ask.
	CPUs, MemoryMiB, MaxCPUs, MaxMemoryMiB int
	// Net is the job VMs' network: "dhcp" (default: a LAN of the job's own), "none", or "pool":
	// each job VM gets a pre-created tap of Taps and DHCP from the operator's network.
	Net string
	// Taps is the tap pool of Net "pool".
	Taps *TapPool
	// SlotWait bounds how long a job with services waits for the extra slots its service VMs
	// need before it is handed back to the queue; default 10 s.
	SlotWait time.Duration
	// LeaseTimeout is how long a running stage may go without a keep-alive from its hook before
	// the guest command is killed; default 15 s.
	LeaseTimeout time.Duration
	Log          zerolog.Logger
}

// Runner is the CI worker of a host: see the package comment.
type Runner struct {
	cfg  Config
	host string
	log  zerolog.Logger

	mu   sync.Mutex
	jobs map[string]*job
	// canceled holds jobs abandoned by their runner before this host registered them (the cancel
	// came between the fetch and the registration), with when: boot then drops them at once.
	canceled map[string]time.Time
	// stopping is closed when Run's ctx ends: running jobs fail as system failures.
	stopping chan struct{}
	wg       sync.WaitGroup
}

// New checks cfg and returns a Runner.
func New(cfg Config) (*Runner, error) {
	if cfg.Client == nil || cfg.Slots == nil || cfg.Machines == nil || cfg.Images == nil {
		return nil, errors.New("jobs: runner needs Client, Slots, Machines and Images")
	}
	if cfg.JobTimeout <= 0 {
		cfg.JobTimeout = time.Hour
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 512
	}
	if cfg.MaxCPUs == 0 {
		cfg.MaxCPUs = cfg.CPUs
	}
	if cfg.MaxMemoryMiB == 0 {
		cfg.MaxMemoryMiB = cfg.MemoryMiB
	}
	switch cfg.Net {
	case "":
		cfg.Net = "dhcp"
	case "dhcp", "none":
	case "pool":
		if cfg.Taps == nil {
			return nil, errors.New(`jobs: net "pool" needs a tap pool (Taps)`)
		}
	default:
		return nil, fmt.Errorf("jobs: net %q: want dhcp, none or pool", cfg.Net)
	}
	if cfg.LeaseTimeout <= 0 {
		cfg.LeaseTimeout = 15 * time.Second
	}
	if cfg.SlotWait <= 0 {
		cfg.SlotWait = 10 * time.Second
	}
	return &Runner{cfg: cfg, host: cfg.Client.Host(), log: cfg.Log, jobs: map[string]*job{}, canceled: map[string]time.Time{}, stopping: make(chan struct{})}, nil
}

// Name implements workers.Worker.
func (r *Runner) Name() string { return "ci" }

// Slots is the host's capacity the runner takes from (one slot per job VM and per service VM).
func (r *Runner) Slots() *broker.Slots { return r.cfg.Slots }

// Running is the number of jobs this host runs.
func (r *Runner) Running() int { r.mu.Lock(); defer r.mu.Unlock(); return len(r.jobs) }

// Run takes jobs until ctx ends; then the jobs still running are torn down and failed as system
// failures (their VMs cannot outlive the host's process).
func (r *Runner) Run(ctx context.Context) error {
	nc := r.cfg.Client.Conn()
	var subs []*nats.Subscription
	defer func() {
		for _, s := range subs {
			s.Unsubscribe()
		}
	}()
	for subj, h := range map[string]func(*nats.Msg){
		ControlSubject(r.host, "exec"):    r.onExec,
		ControlSubject(r.host, "cleanup"): r.onCleanup,
		ControlSubject(r.host, "status"):  r.onStatus,
		CancelSubject:                     r.onCancel,
	} {
		s, err := nc.Subscribe(subj, func(m *nats.Msg) {
			r.wg.Add(1)
			go func() { defer r.wg.Done(); h(m) }()
		})
		if err != nil {
			return fmt.Errorf("jobs: subscribe %s: %w", subj, err)
		}
		subs = append(subs, s)
	}
	if err := nc.Flush(); err != nil {
		return fmt.Errorf("jobs: subscribe: %w", err)
	}
	runDone := make(chan struct{})
	go func() {
		select {
		case <-ctx.Done():
			close(r.stopping)
		case <-runDone:
		}
	}()
	err := r.cfg.Client.RunWork(ctx, broker.WorkOptions{Subject: broker.WorkCIJob, Slots: r.cfg.Slots, Log: r.log}, r.handle)
	close(runDone)
	for _, s := range subs {
		s.Unsubscribe()
	}
	r.wg.Wait()
	return err
}

// job is one running job on this host.
type job struct {
	spec     Spec
	lan      string
	vm       Machine
	agent    *client.Client
	services []*service
	// slots is how many host slots the job holds besides its work item's (one per service VM);
	// tap is the pool tap its VM leases ("" without).
	slots   int
	tap     string
	cleanup chan cleanupAsk
	// gone is closed once the job is torn down.
	gone chan struct{}
	// ready is set (under Runner.mu) once the job VM answers and job.started is out.
	ready bool
	// abort cancels the job's context; aborted says the runner abandoned it while it booted.
	abort   context.CancelFunc
	aborted atomic.Bool
	log     zerolog.Logger

	mu    sync.Mutex
	execs map[string]*client.Session
	ended bool
}

type service struct {
	spec Service
	m    Machine
	sess *client.Session
	ag   *client.Client
}

type cleanupAsk struct {
	req  CleanupRequest
	done chan struct{}
}

func (r *Runner) publish(ctx context.Context, ev broker.Event) {
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 15*time.Second)
	defer cancel()
	if _, err := r.cfg.Client.Publish(ctx, ev); err != nil {
		r.log.Error().Err(err).Str("event", ev.EventType()).Msg("publish")
	}
}

func (r *Runner) handle(ctx context.Context, w *broker.Work) error {
	var spec Spec
	if err := w.Decode(&spec); err != nil {
		return err
	}
	if err := spec.Validate(); err != nil {
		return broker.Permanent(err)
	}
	log := r.log.With().Str("job", spec.ID).Logger()
	if w.Attempt > 1 {
		r.mu.Lock()
		_, here := r.jobs[spec.ID]
		r.mu.Unlock()
		if here {
			// A second delivery of a job this host runs (an ack or progress report lost while the
			// cluster changed leaders): the job goes on; this delivery is done.
			log.Info().Int("attempt", w.Attempt).Msg("duplicate delivery of a job running here")
			return nil
		}
		if holder, taken := r.taken(ctx, spec.ID); taken && holder != r.host && r.holds(ctx, holder, spec.ID) {
			// Another live host runs it; the item came back because the cluster lost track of
			// its progress reports (a NATS node died). That host carries on; this delivery is done.
			log.Info().Int("attempt", w.Attempt).Str("holder", holder).Msg("duplicate delivery of a job another host runs")
			return nil
		} else if taken {
			// The host that took it before died or stopped mid-job: its VM is gone with it. Running
			// the job again here could run a stage twice; GitLab retries system failures instead.
			log.Warn().Int("attempt", w.Attempt).Msg("redelivered job: failing it as a system failure")
			r.publish(ctx, &broker.JobFailed{Job: spec.ID, ExitCode: -1, System: true,
				Error: "the host that took this job went away before it ended; it is not run twice"})
			// Should that host still be alive after all, it drops the job.
			b, _ := json.Marshal(CleanupRequest{Job: spec.ID})
			r.cfg.Client.Conn().Publish(CancelSubject, b)
			return nil
		}
		// No host ever started it (the delivery was lost on the way): run it.
		log.Info().Int("attempt", w.Attempt).Msg("redelivered job that no host started; running it")
	}
	timeout := r.cfg.JobTimeout
	if t := time.Duration(spec.Timeout); t > 0 && t < timeout {
		timeout = t
	}
	jctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	j, err := r.boot(jctx, spec, log, cancel)
	if errors.Is(err, errNoRoom) {
		// Not enough free slots for its service VMs right now: the item goes back to the queue
		// (after a back-off) for this or another host, untouched.
		log.Info().Err(err).Msg("handing the job back")
		return err
	}
	if err != nil && j != nil && j.aborted.Load() {
		log.Info().Msg("job abandoned by its runner while booting")
		r.publish(ctx, &broker.JobCanceled{Job: spec.ID, Reason: "abandoned by the runner before its VM was ready"})
		return nil
	}
	if err != nil {
		var f *Failure
		system := !errors.As(err, &f) || f.System
		log.Warn().Err(err).Bool("system", system).Msg("job did not start")
		r.publish(ctx, &broker.JobFailed{Job: spec.ID, ExitCode: -1, System: system, Error: err.Error()})
		return nil
	}
	r.mu.Lock()
	j.ready = true
	r.mu.Unlock()
	r.publish(ctx, &broker.JobStarted{Job: spec.ID, Host: r.host, VM: spec.ID})
	log.Info().Str("vm", spec.ID).Dur("timeout", timeout).Msg("job ready")

	var ask *cleanupAsk
	var final broker.Event
	select {
	case a := <-j.cleanup:
		ask = &a
		if a.req.Failed {
			final = &broker.JobFailed{Job: spec.ID, ExitCode: a.req.ExitCode}
		} else {
			final = &broker.JobSucceeded{Job: spec.ID}
		}
	case <-jctx.Done():
		if ctx.Err() == nil {
			final = &broker.JobCanceled{Job: spec.ID, Reason: fmt.Sprintf("reaped: no cleanup within the job timeout (%v)", timeout)}
			log.Warn().Dur("timeout", timeout).Msg("reaping job: no cleanup within its timeout")
		} else {
			final = &broker.JobFailed{Job: spec.ID, ExitCode: -1, System: true, Error: "the host stopped"}
		}
	case <-r.stopping:
		final = &broker.JobFailed{Job: spec.ID, ExitCode: -1, System: true, Error: "the host is shutting down"}
	}
	r.teardown(j)
	r.publish(ctx, final)
	if ask != nil {
		close(ask.done)
	}
	log.Info().Str("end", final.EventType()).Msg("job cleaned up")
	return nil
}

// errNoRoom says a job needs more free slots than the host has now; it is handed back.
var errNoRoom = errors.New("jobs: not enough free slots on this host for the job's service VMs")

// boot resolves the images and boots the services and the job VM together, all on the job's LAN.
// On error nothing is left running.
// It returns the job even on error when the runner abandoned it meanwhile (aborted is set).
func (r *Runner) boot(ctx context.Context, spec Spec, log zerolog.Logger, abort context.CancelFunc) (_ *job, err error) {
	cpus, mem := spec.CPUs, spec.MemoryMiB
	if cpus == 0 {
		cpus = r.cfg.CPUs
	}
	if mem == 0 {
		mem = r.cfg.MemoryMiB
	}
	if cpus > r.cfg.MaxCPUs || mem > r.cfg.MaxMemoryMiB {
		return nil, &Failure{Msg: fmt.Sprintf("job asks for %d cpus / %d MiB; this host allows at most %d cpus / %d MiB", cpus, mem, r.cfg.MaxCPUs, r.cfg.MaxMemoryMiB)}
	}
	// Every service VM takes a slot of the host's capacity, as the job VM does (its work item's).
	extra := len(spec.Services)
	if extra > 0 {
		if r.cfg.Net == "pool" {
			return nil, &Failure{Msg: `services: need the switch network; this host runs jobs on pool taps (net.mode = "pool")`}
		}
		if c := r.cfg.Slots.Capacity(); 1+extra > c {
			return nil, &Failure{Msg: fmt.Sprintf("job with %d services needs %d VM slots; this host has %d (vm.capacity)", extra, 1+extra, c)}
		}
		// Running jobs may end meanwhile, and no new work is fetched while this waits; a job that
		// still finds no room is handed back rather than waited for, so that jobs which each hold
		// a slot the other needs cannot block each other for long.
		wctx, cancel := context.WithTimeout(ctx, r.cfg.SlotWait)
		err := r.cfg.Slots.Reserve(wctx, extra)
		cancel()
		if err != nil {
			return nil, errNoRoom
		}
	}
	j := &job{abort: abort, spec: spec, lan: "ci-" + spec.ID, slots: extra, cleanup: make(chan cleanupAsk), gone: make(chan struct{}), log: log, execs: map[string]*client.Session{}}
	r.mu.Lock()
	if _, dup := r.jobs[spec.ID]; dup {
		r.mu.Unlock()
		r.cfg.Slots.Release(extra)
		return nil, &Failure{System: true, Msg: fmt.Sprintf("job %s already runs on this host", spec.ID)}
	}
	r.jobs[spec.ID] = j
	_, canceled := r.canceled[spec.ID]
	delete(r.canceled, spec.ID)
	r.mu.Unlock()
	defer func() {
		if err != nil {
			r.teardown(j)
		}
	}()
	if canceled {
		j.aborted.Store(true)
		return j, errors.New("abandoned by its runner before this host registered it")
	}
	// The mark that a host took the job: a redelivered item finds it and is not run twice. It
	// must be stored before the job can run a stage (job.started), not before its VM boots (a VM
	// dies with its host), so it is published while the VMs boot.
	marked := make(chan struct{})
	go func() {
		defer close(marked)
		r.publish(ctx, &broker.VMStarting{VM: spec.ID, Host: r.host, Image: spec.Image, CPUs: cpus, MemoryMiB: mem, Job: spec.ID})
	}()
	defer func() { <-marked }()
	bundle, err := r.cfg.Images.Resolve(ctx, spec.Image)
	if err != nil {
		return j, err
	}
	sbs := make([]*store.Bundle, len(spec.Services))
	for i, sv := range spec.Services {
		if sbs[i], err = r.cfg.Images.Resolve(ctx, sv.Image); err != nil {
			return j, err
		}
		j.services = append(j.services, &service{spec: sv})
	}
	req := launcher.Request{Name: spec.ID, Rootfs: bundle.Rootfs, CPUs: cpus, MemoryMiB: mem, Net: r.cfg.Net, LAN: j.lan}
	if r.cfg.Net == "pool" {
		if j.tap, err = r.cfg.Taps.Lease(spec.ID); err != nil {
			return j, &Failure{System: true, Msg: err.Error()}
		}
		req.Net, req.LAN, req.Tap = "dhcp", "", j.tap
	}
	// The VMs boot side by side: a job with services is ready in about one boot's time.
	errs := make([]error, 1+len(spec.Services))
	var wg sync.WaitGroup
	for i, s := range j.services {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[1+i] = r.bootService(ctx, j, s, sbs[i], i)
		}()
	}
	var vm Machine
	wg.Add(1)
	go func() {
		defer wg.Done()
		if vm, errs[0] = r.cfg.Machines.Boot(ctx, req); errs[0] != nil {
			errs[0] = &Failure{System: true, Msg: fmt.Sprintf("boot job VM: %v", errs[0])}
			return
		}
		j.mu.Lock()
		j.vm = vm
		j.mu.Unlock()
		if j.agent, errs[0] = dialAgent(ctx, vm); errs[0] != nil {
			errs[0] = &Failure{System: true, Msg: fmt.Sprintf("job VM agent: %v", errs[0])}
			return
		}
		if j.tap != "" {
			// On a tap the address comes from the operator's DHCP server, which may take a while:
			// the job's first stage expects a network.
			addr, err := waitNetwork(ctx, j.agent, NetWait)
			if err != nil {
				errs[0] = &Failure{System: true, Msg: fmt.Sprintf("job VM on tap %s: %v", j.tap, err)}
				return
			}
			j.log.Info().Str("tap", j.tap).RawJSON("address", addr).Msg("job VM on the operator's network")
		}
	}()
	wg.Wait()
	for _, e := range errs {
		if e != nil {
			return j, e
		}
	}
	if err := r.linkServices(ctx, j); err != nil {
		return j, &Failure{System: true, Msg: fmt.Sprintf("services: %v", err)}
	}
	return j, nil
}

// bootService boots service i of job j, starts its entrypoint and waits (briefly) for the TCP
// ports its image exposes, as GitLab Runner's service health check does: a service that never
// listens is the job's business, so the wait only bounds the job's start.
func (r *Runner) bootService(ctx context.Context, j *job, s *service, b *store.Bundle, i int) error {
	sv := s.spec
	m, err := r.cfg.Machines.Boot(ctx, launcher.Request{Name: j.spec.ID + "-s" + strconv.Itoa(i), Rootfs: b.Rootfs, CPUs: 1, MemoryMiB: r.cfg.MemoryMiB, Net: r.cfg.Net, LAN: j.lan})
	if err != nil {
		return &Failure{System: true, Msg: fmt.Sprintf("service %s: %v", sv.Image, err)}
	}
	j.mu.Lock()
	s.m = m
	j.mu.Unlock()
	if s.ag, err = dialAgent(ctx, m); err != nil {
		return &Failure{System: true, Msg: fmt.Sprintf("service %s: %v", sv.Image, err)}
	}
	argv := sv.Entrypoint
	if len(argv) == 0 {
		argv = b.Image.Entrypoint
	}
	cmd := sv.Command
	if len(cmd) == 0 && len(sv.Entrypoint) == 0 {
		cmd = b.Image.Cmd
	}
	argv = append(append([]string{}, argv...), cmd...)
	if len(argv) == 0 {
		return &Failure{Msg: fmt.Sprintf("service %s has no entrypoint or command", sv.Image)}
	}
	env := append(append([]string{}, b.Image.Env...), sv.Env...)
	// The service runs as a session for the job's life; its output is not kept.
	sess, err := s.ag.StartIO(context.WithoutCancel(ctx), client.ExecRequest{Argv: argv, Env: env, Dir: b.Image.WorkingDir, User: b.Image.User}, nil, nil)
	if err != nil {
		return &Failure{System: true, Msg: fmt.Sprintf("service %s: start %v: %v", sv.Image, argv, err)}
	}
	j.mu.Lock()
	s.sess = sess
	j.mu.Unlock()
	wctx, cancel := context.WithTimeout(ctx, ServiceWait)
	defer cancel()
	for _, p := range b.Image.ExposedPorts {
		port, proto, _ := strings.Cut(p, "/")
		n, err := strconv.Atoi(port)
		if err != nil || proto != "tcp" && proto != "" {
			continue
		}
		for {
			c, err := s.ag.Forward(wctx, n)
			if err == nil {
				c.Close()
				break
			}
			select {
			case <-sess.Done():
				return &Failure{Msg: fmt.Sprintf("service %s exited before it listened on port %d", sv.Image, n)}
			case <-wctx.Done():
				j.log.Warn().Str("service", sv.Image).Int("port", n).Msg("service does not listen on its exposed port yet; starting the job anyway")
				return nil
			case <-time.After(100 * time.Millisecond):
			}
		}
	}
	return nil
}

// NetWait bounds the wait for a tap VM's address from the operator's DHCP server.
const NetWait = 60 * time.Second

// netReadyFile is where the guest agent's network process records the address it applied
// (agent/initproc.NetReadyFile).
const netReadyFile = "/run/virtkit/net.json"

// waitNetwork waits until the guest's network is configured and returns what it recorded.
func waitNetwork(ctx context.Context, ag *client.Client, d time.Duration) ([]byte, error) {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	for {
		var b bytes.Buffer
		if err := ag.CopyOut(ctx, netReadyFile, &b); err == nil {
			if body, err := tarFile(&b); err == nil && json.Valid(bytes.TrimSpace(body)) {
				return bytes.TrimSpace(body), nil
			}
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("no address from the network's DHCP server within %v", d)
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// ServiceWait bounds the wait for a service's exposed ports (GitLab's wait_for_services_timeout).
const ServiceWait = 30 * time.Second

// linkServices makes each service reachable from the job VM under its aliases: names in the job
// LAN's DNS (as <alias> through the search domain, and <alias>.lan) and lines in the job VM's
// /etc/hosts, which also carry GitLab's derived names with '_' and '.' that resolvers may not ask
// DNS for.
func (r *Runner) linkServices(ctx context.Context, j *job) error {
	var hosts strings.Builder
	for _, s := range j.services {
		ip := s.m.IP()
		if ip == "" {
			continue
		}
		for _, a := range s.spec.Aliases {
			r.cfg.Machines.SetHost(j.lan, a, ip)
		}
		if len(s.spec.Aliases) > 0 {
			fmt.Fprintf(&hosts, "%s\t%s\n", ip, strings.Join(s.spec.Aliases, " "))
		}
	}
	if hosts.Len() == 0 {
		return nil
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	var cur bytes.Buffer
	if err := j.agent.CopyOut(ctx, "/etc/hosts", &cur); err != nil {
		return fmt.Errorf("read the job VM's /etc/hosts: %w", err)
	}
	old, err := tarFile(&cur)
	if err != nil {
		return fmt.Errorf("read the job VM's /etc/hosts: %w", err)
	}
	body := append(append(bytes.TrimRight(old, "\n"), "\n# virtkit: the job's services\n"...), hosts.String()...)
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Name: "hosts", Mode: 0o644, Size: int64(len(body)), Typeflag: tar.TypeReg, ModTime: time.Now()})
	tw.Write(body)
	tw.Close()
	if err := j.agent.CopyIn(ctx, "/etc", &tb); err != nil {
		return fmt.Errorf("write the job VM's /etc/hosts: %w", err)
	}
	return nil
}

// tarFile returns the body of the first regular file of a tar stream.
func tarFile(r io.Reader) ([]byte, error) {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			return io.ReadAll(io.LimitReader(tr, 1<<20))
		}
	}
}

// teardown stops the job's VMs and forgets it. Stages still running end with a system failure.
func (r *Runner) teardown(j *job) {
	j.mu.Lock()
	j.ended = true
	for _, s := range j.execs {
		s.Close()
	}
	j.mu.Unlock()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	stop := func(m Machine) {
		defer wg.Done()
		if err := m.Stop(ctx); err != nil {
			j.log.Warn().Err(err).Msg("stop VM")
		}
	}
	if j.agent != nil {
		j.agent.Close()
	}
	if j.vm != nil {
		wg.Add(1)
		go stop(j.vm)
	}
	for _, s := range j.services {
		if s.sess != nil {
			s.sess.Close()
		}
		if s.ag != nil {
			s.ag.Close()
		}
		if s.m != nil {
			wg.Add(1)
			go stop(s.m)
		}
	}
	wg.Wait()
	if j.tap != "" {
		r.cfg.Taps.Return(j.tap)
	}
	r.cfg.Slots.Release(j.slots)
	r.mu.Lock()
	if r.jobs[j.spec.ID] == j {
		delete(r.jobs, j.spec.ID)
	}
	r.mu.Unlock()
	close(j.gone)
}

func (r *Runner) lookup(id string) *job {
	r.mu.Lock()
	defer r.mu.Unlock()
	j := r.jobs[id]
	if j == nil || !j.ready {
		return nil
	}
	return j
}

// onCancel handles a runner abandoning a job (prepare killed or timed out): a job still booting
// is aborted, a ready one cleaned up.
func (r *Runner) onCancel(m *nats.Msg) {
	var req CleanupRequest
	if json.Unmarshal(m.Data, &req) != nil {
		return
	}
	r.mu.Lock()
	j := r.jobs[req.Job]
	ready := j != nil && j.ready
	if j == nil {
		// Perhaps fetched but not registered yet: boot drops it when it registers. Any host may
		// keep such a note, so old ones are forgotten.
		now := time.Now()
		for id, t := range r.canceled {
			if now.Sub(t) > 10*time.Minute {
				delete(r.canceled, id)
			}
		}
		r.canceled[req.Job] = now
	}
	r.mu.Unlock()
	switch {
	case j == nil:
	case !ready:
		j.aborted.Store(true)
		j.abort()
	default:
		ask := cleanupAsk{req: CleanupRequest{Job: req.Job, Failed: true, ExitCode: -1}, done: make(chan struct{})}
		select {
		case j.cleanup <- ask:
			<-ask.done
		case <-j.gone:
		}
	}
}

func respond(m *nats.Msg, rep Reply) {
	b, _ := json.Marshal(rep)
	m.Respond(b)
}

func (r *Runner) onCleanup(m *nats.Msg) {
	var req CleanupRequest
	if err := json.Unmarshal(m.Data, &req); err != nil {
		respond(m, Reply{Error: "bad cleanup request: " + err.Error()})
		return
	}
	j := r.lookup(req.Job)
	if j == nil {
		respond(m, Reply{OK: true, Unknown: true})
		return
	}
	ask := cleanupAsk{req: req, done: make(chan struct{})}
	select {
	case j.cleanup <- ask:
		<-ask.done
	case <-j.gone:
		// The job ended by itself meanwhile (reaped, host stopping): nothing left to do.
	}
	respond(m, Reply{OK: true})
}

// dialAgent connects to a booted VM's agent: the machine's own connection when it offers one
// (TakeAgent), else a new one. The launcher saw it answer, so the agent's hello is
// proof enough; should the first dial fail it retries briefly (anything slower than a minute is a
// fault).
func dialAgent(ctx context.Context, m Machine) (*client.Client, error) {
	if t, ok := m.(interface{ TakeAgent() *client.Client }); ok {
		if c := t.TakeAgent(); c != nil {
			return c, nil // the connection that saw the agent answer at boot
		}
	}
	ctx, cancel := context.WithTimeout(ctx, time.Minute)
	defer cancel()
	dctx, dcancel := context.WithTimeout(ctx, 5*time.Second)
	c, err := client.Dial(dctx, m.ExecURL())
	dcancel()
	if err == nil {
		return c, nil
	}
	return client.WaitReady(ctx, m.ExecURL())
}

// taken reports whether some host marked job id as taken (vm.starting with the job's name), and
// which.
func (r *Runner) taken(ctx context.Context, id string) (string, bool) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	st, err := r.cfg.Client.JetStream().Stream(ctx, broker.EventsStream)
	if err != nil {
		return "", true // cannot tell: the safe answer never runs a job twice
	}
	m, err := st.GetLastMsgForSubject(ctx, broker.EventFilter("vm", id, "starting"))
	if errors.Is(err, jetstream.ErrMsgNotFound) {
		return "", false
	}
	if err != nil {
		return "", true
	}
	env, err := broker.DecodeEnvelope(m.Data, m.Subject)
	if err != nil {
		return "", true
	}
	return env.Source, true
}

// holds asks host whether it runs job id (booting or ready).
func (r *Runner) holds(ctx context.Context, host, id string) bool {
	if broker.ValidID(host) != nil {
		return false
	}
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	b, _ := json.Marshal(CleanupRequest{Job: id})
	m, err := r.cfg.Client.Conn().RequestWithContext(ctx, ControlSubject(host, "status"), b)
	if err != nil {
		return false
	}
	var rep Reply
	return json.Unmarshal(m.Data, &rep) == nil && rep.OK
}

// onStatus answers whether this host runs a job (booting or ready).
func (r *Runner) onStatus(m *nats.Msg) {
	var req CleanupRequest
	if json.Unmarshal(m.Data, &req) != nil {
		respond(m, Reply{Error: "bad status request"})
		return
	}
	r.mu.Lock()
	j := r.jobs[req.Job]
	r.mu.Unlock()
	respond(m, Reply{OK: j != nil && !j.aborted.Load(), Unknown: j == nil})
}
