// Package initproc is virtkit-agent's PID 1 for systemd-less guests: it mounts the API
// filesystems, assembles the root (a read-only base image plus a writable layer with overlayfs,
// or a plain writable root), sets the host name, loopback, /etc/hosts and resolv.conf, mounts
// virtio-fs shares, supervises the network relay and sshd, serves the exec server, and then runs
// the image's entrypoint, just serves, or hands PID 1 to systemd. It reaps orphans, reports the
// entrypoint's exit code on the console ("virtkit: exit-code N") and over the exec server, and on
// shutdown stops every process, syncs, unmounts and powers off.
//
// Configuration comes from virtkit.* kernel command line keys, a config file and VIRTKIT_*
// environment variables (KEYS.md in agent/). Nothing here panics without a console message: a
// PID 1 that dies takes the kernel with it.
//
// Concurrency: Run is called once per process; it owns every goroutine it starts.
package initproc

import (
	"context"
	"errors"
	"fmt"
	"log"
	"net"
	"os"
	"os/signal"
	"runtime/debug"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/execserver"
	"github.com/virtkit/virtkit/agent/proto"
	"github.com/virtkit/virtkit/agent/reaper"
)

// Options are what the command line of `virtkit-agent init` can set; the kernel passes none.
type Options struct {
	Version    string
	Cmdline    string // overrides /proc/cmdline when not empty (tests, containers)
	ConfigFile string // default /etc/virtkit/agent.conf
	NoSwitch   bool   // never power off/reboot: exit instead (for running under another init)
}

// Init is the running PID 1.
type Init struct {
	opt     Options
	cfg     Config
	console *os.File
	self    string
	reaper  *reaper.Reaper
	start   time.Time
	kernel  time.Duration

	mu    sync.Mutex
	marks []proto.Mark
	ep    *proto.Entrypoint
	epEnd chan struct{}
	// volErr is set when a virtkit.volume could not be mounted: the entrypoint then does not run
	// (it would write its data beside the volume).
	volErr error

	shutdown chan bool // a shutdown request; true: power off, false: reboot
}

func (in *Init) log(format string, args ...any) {
	fmt.Fprintf(in.console, "virtkit: "+format+"\n", args...)
}

func (in *Init) mark(name string) {
	in.mu.Lock()
	in.marks = append(in.marks, proto.Mark{Name: name, Since: time.Since(in.start)})
	in.mu.Unlock()
}

// Run is PID 1's main. It only returns (with an exit code) when not running as PID 1 or with
// NoSwitch; as PID 1 it ends by powering off or rebooting the machine.
func Run(opt Options) (code int) {
	in := &Init{opt: opt, console: os.Stderr, start: time.Now(), shutdown: make(chan bool, 1), epEnd: make(chan struct{})}
	in.kernel = kernelUptime()
	defer func() {
		if r := recover(); r != nil {
			in.log("PANIC: %v\n%s", r, debug.Stack())
			code = in.finish(false, 255)
		}
	}()
	unix.Umask(0o022)
	if os.Getenv("PATH") == "" {
		// The kernel gives init no PATH; children (relay, sshd, the entrypoint's base) need one.
		os.Setenv("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	// So that init's mounts never leak to a parent namespace (harmless in a VM).
	_ = unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, "")
	if err := in.do(earlyMounts); err != nil {
		in.log("%v", err)
	}
	consoleStdio()
	if machineInit() {
		// Ctrl-Alt-Del becomes SIGINT to us (an orderly shutdown) instead of an instant reboot.
		_ = unix.Reboot(unix.LINUX_REBOOT_CMD_CAD_OFF)
	}
	in.mark("early-mounts")
	in.self, _ = os.Executable()
	if err := in.loadConfig(); err != nil {
		in.log("%v (continuing with what parsed)", err)
	}
	if len(in.cfg.Unknown) > 0 {
		in.log("ignoring unknown keys %v", in.cfg.Unknown)
	}
	in.reaper = reaper.New(true)
	if in.cfg.Overlay != "" {
		if err := in.assembleRoot(); err != nil {
			in.log("%v; continuing on the plain root", err)
		} else {
			in.mark("root")
		}
	}
	if err := in.do(lateMounts); err != nil {
		in.log("%v", err)
	}
	makeDevLinks()
	in.mark("mounts")
	in.setupIdentity()
	if err := loopbackUp(); err != nil {
		in.log("loopback: %v", err)
	}
	for _, s := range in.cfg.FS {
		flags := uintptr(0)
		if s.RO {
			flags |= unix.MS_RDONLY
		}
		if err := mountOne(Mount{Source: s.Tag, Target: s.Path, FSType: "virtiofs", Flags: flags, Mode: 0o755}); err != nil {
			in.log("virtio-fs %s: %v", s.Tag, err)
		}
	}
	for _, v := range in.cfg.Volumes {
		if err := mountVolume(v); err != nil {
			in.log("%v", err)
			in.volErr = errors.Join(in.volErr, err)
		}
	}
	in.mark("filesystems")

	if in.cfg.Mode == ModeSystemd {
		in.handOff()
	}

	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var svcs sync.WaitGroup
	if in.cfg.Net.Mode != "none" {
		in.supervise(ctx, &svcs, &service{name: "network relay", argv: in.relayArgv(), env: os.Environ()})
	}

	srvDone := make(chan error, 1)
	go func() {
		defer func() {
			if r := recover(); r != nil {
				in.log("PANIC in the exec server: %v\n%s", r, debug.Stack())
				srvDone <- fmt.Errorf("panic: %v", r)
			}
		}()
		srvDone <- in.serve(ctx)
	}()
	if len(in.cfg.SSHKeys) > 0 {
		// Host key generation takes a while: never before the exec server is up.
		svcs.Add(1)
		go func() {
			defer svcs.Done()
			if argv := in.prepareSSH(); argv != nil && ctx.Err() == nil {
				in.supervise(ctx, &svcs, &service{name: "sshd", argv: argv, env: os.Environ()})
			}
		}()
	}

	sigs := make(chan os.Signal, 4)
	// SIGINT: Ctrl-Alt-Del; SIGPWR: ACPI power button via the kernel; SIGTERM: a container runtime.
	signal.Notify(sigs, unix.SIGINT, unix.SIGTERM, unix.SIGPWR, unix.SIGHUP, unix.SIGUSR1, unix.SIGUSR2, unix.SIGQUIT, unix.SIGWINCH)
	exit := 0
	poweroff := true
	switch in.cfg.Mode {
	case ModeEntrypoint:
		exit, poweroff = in.runEntrypoint(sigs)
	default:
		for {
			select {
			case sig := <-sigs:
				if sig == unix.SIGINT || sig == unix.SIGTERM || sig == unix.SIGPWR {
					in.log("%v received, shutting down", sig)
					goto down
				}
				continue
			case poweroff = <-in.shutdown:
				goto down
			case err := <-srvDone:
				if err != nil {
					in.log("exec server stopped: %v", err)
				}
				srvDone = nil
				continue
			}
		}
	}
down:
	signal.Stop(sigs)
	cancel()
	svcs.Wait()
	return in.finish(poweroff, exit)
}

// serve runs the exec server until ctx ends. A listener that cannot be created yet (a vsock
// device still probing) is retried rather than leaving a guest nobody can reach.
func (in *Init) serve(ctx context.Context) error {
	var l net.Listener
	for attempt := 0; ; attempt++ {
		var err error
		if l, err = addr.Listen(in.cfg.Listen); err == nil {
			break
		}
		if attempt == 0 {
			in.log("exec server: %v (retrying)", err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(200 * time.Millisecond):
		}
	}
	in.mark("serving")
	in.log("serving on %s (%s)", in.cfg.Listen, in.timings())
	return execserver.New(in.serverConfig()).Serve(ctx, l)
}

func (in *Init) loadConfig() error {
	cmdline := in.opt.Cmdline
	if cmdline == "" {
		b, _ := os.ReadFile("/proc/cmdline")
		cmdline = string(b)
	}
	path := in.opt.ConfigFile
	if path == "" {
		path = "/etc/virtkit/agent.conf"
	}
	file, err := os.ReadFile(path)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		in.log("config file %s: %v", path, err)
	}
	cfg, err := Load(string(file), cmdline, os.Environ())
	in.cfg = cfg
	if in.cfg.Mode == "" {
		in.cfg.Mode = ModeAgent
		if _, err := os.Stat(in.cfg.Image); err == nil || len(in.cfg.Command) > 0 {
			in.cfg.Mode = ModeEntrypoint
		}
	}
	return err
}

func (in *Init) serverConfig() execserver.Config {
	var env []string
	if im, err := in.image(); err == nil {
		env = im.Env
	}
	return execserver.Config{
		Log:      log.New(in.console, "virtkit: exec server: ", 0),
		Debug:    in.cfg.Debug,
		Software: "virtkit-agent " + in.opt.Version,
		Version:  in.opt.Version,
		Reaper:   in.reaper,
		Env:      env,
		Allow:    in.cfg.Allow,
		Wrapper:  in.cfg.Wrapper,
		Info:     in.fillInfo,
		Shutdown: func(poweroff bool) {
			select {
			case in.shutdown <- poweroff:
			default:
			}
		},
		WaitEntrypoint: func(ctx context.Context) (proto.Exit, error) {
			if in.cfg.Mode != ModeEntrypoint {
				return proto.Exit{}, errors.New("the guest is not in entrypoint mode")
			}
			select {
			case <-in.epEnd:
				in.mu.Lock()
				defer in.mu.Unlock()
				return *in.ep.Exit, nil
			case <-ctx.Done():
				return proto.Exit{}, ctx.Err()
			}
		},
	}
}

func (in *Init) fillInfo(info *proto.Info) {
	in.mu.Lock()
	defer in.mu.Unlock()
	info.Mode = in.cfg.Mode
	info.Boot = slices.Clone(in.marks)
	info.KernelBoot = in.kernel
	info.Uptime = time.Since(in.start)
	if in.ep != nil {
		e := *in.ep
		info.Entrypoint = &e
	}
}

func (in *Init) timings() string {
	in.mu.Lock()
	defer in.mu.Unlock()
	parts := []string{fmt.Sprintf("kernel %s", in.kernel.Round(time.Millisecond))}
	for _, m := range in.marks {
		parts = append(parts, fmt.Sprintf("%s +%s", m.Name, m.Since.Round(10*time.Microsecond)))
	}
	return "boot: " + strings.Join(parts, ", ")
}

// setupIdentity sets the host name and writes /etc/hostname, /etc/hosts and resolv.conf.
func (in *Init) setupIdentity() {
	name := in.cfg.Hostname
	if name == "" {
		if b, err := os.ReadFile("/etc/hostname"); err == nil {
			name = strings.TrimSpace(string(b))
		}
	}
	if name == "" {
		name = "virtkit"
	}
	if err := unix.Sethostname([]byte(name)); err != nil {
		in.log("hostname: %v", err)
	}
	if in.cfg.Hostname != "" {
		if err := writeEtc("hostname", []byte(name+"\n")); err != nil {
			in.log("/etc/hostname: %v", err)
		}
	}
	hosts := fmt.Sprintf("127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n127.0.1.1\t%s\n", name)
	if err := writeEtc("hosts", []byte(hosts)); err != nil {
		in.log("/etc/hosts: %v", err)
	}
	if len(in.cfg.DNS) > 0 {
		var b strings.Builder
		for _, a := range in.cfg.DNS {
			fmt.Fprintf(&b, "nameserver %s\n", a)
		}
		if err := writeEtc("resolv.conf", []byte(b.String())); err != nil {
			in.log("/etc/resolv.conf: %v", err)
		}
	}
}

// loopbackUp brings lo up; the kernel then gives it 127.0.0.1/8 and ::1.
func loopbackUp() error {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	ifr, err := unix.NewIfreq("lo")
	if err != nil {
		return err
	}
	if err := unix.IoctlIfreq(fd, unix.SIOCGIFFLAGS, ifr); err != nil {
		return err
	}
	ifr.SetUint16(ifr.Uint16() | unix.IFF_UP)
	return unix.IoctlIfreq(fd, unix.SIOCSIFFLAGS, ifr)
}

func kernelUptime() time.Duration {
	var ts unix.Timespec
	if unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts) != nil {
		return 0
	}
	return time.Duration(ts.Nano())
}

// reportExit writes the entrypoint's exit code where virtkit.exitcode says.
func (in *Init) reportExit(code int) {
	line := fmt.Sprintf("virtkit: exit-code %d\n", code)
	dst := in.cfg.ExitCode
	switch {
	case dst == "" || dst == "console":
		fmt.Fprint(in.console, line)
		return
	case dst == "none":
		return
	case strings.HasPrefix(dst, "/"):
		f, err := os.OpenFile(dst, os.O_WRONLY|unix.O_NOCTTY, 0)
		if err == nil {
			_, err = f.WriteString(line)
			f.Close()
		}
		if err != nil {
			in.log("exit code to %s: %v", dst, err)
		}
	default:
		ctx, cancel := context.WithTimeout(context.Background(), 3*time.Second)
		defer cancel()
		var c net.Conn
		c, err := addr.Dial(ctx, dst)
		if err == nil {
			_, err = c.Write([]byte(line))
			c.Close()
		}
		if err != nil {
			in.log("exit code to %s: %v", dst, err)
		}
	}
	// The console always gets it too: it is the channel of last resort.
	fmt.Fprint(in.console, line)
}

// consoleStdio gives init stdin/stdout/stderr on /dev/console when the kernel could not (a root
// without /dev/console and no devtmpfs automount): a PID 1 that cannot print is undebuggable.
func consoleStdio() {
	if _, err := unix.FcntlInt(2, unix.F_GETFD, 0); err == nil {
		return
	}
	fd, err := unix.Open("/dev/console", unix.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return
	}
	for i := 0; i < 3; i++ {
		if i != fd {
			_ = unix.Dup3(fd, i, 0)
		}
	}
	if fd > 2 {
		unix.Close(fd)
	}
}
