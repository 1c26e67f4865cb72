package cli

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/agent/addr"
	"github.com/virtkit/virtkit/agent/client"
	"github.com/virtkit/virtkit/imaging/oci"
	"github.com/virtkit/virtkit/imaging/store"
	"github.com/virtkit/virtkit/workers/launcher"
)

func init() { register(newRun) }

type runFlags struct {
	img                      imageFlags
	interactive, tty, detach bool
	env, volumes, publish    []string
	workdir, user, name      string
	cpus                     int
	memory                   string
	net                      string
	vmm, kernel              string
}

func newRun(e *env) *cobra.Command {
	var f runFlags
	cmd := &cobra.Command{
		Use:   "run [flags] IMAGE [-- CMD [ARG...]]",
		Short: "Boot IMAGE as a microVM, run CMD (or the image's entrypoint) in it, then tear it down",
		Long: `Convert IMAGE if needed (cached), boot it as a microVM with a throwaway writable layer, run CMD
in it (default: the image's entrypoint and cmd) with its output streamed here, and return its exit
code (128+N when it died of signal N). The VM is torn down afterwards unless -d keeps it running.

IMAGE is docker://REF or a bare registry reference, oci:PATH[:TAG], docker-archive:PATH or tar:PATH.
With no daemon running (virtkit serve), run embeds a one-shot broker and the workers it needs.`,
		Example: `  virtkit run tar:debian.tar -- uname -a
  virtkit run -it tar:debian.tar -- bash
  virtkit run -v $PWD:/src -p 8080:80 -e MODE=dev oci:./web`,
		Args: cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			argv := args[1:]
			if len(argv) > 0 && argv[0] == "--" {
				argv = argv[1:]
			}
			return runImage(cmd.Context(), e, &f, args[0], argv)
		},
	}
	fl := cmd.Flags()
	f.img.add(fl)
	fl.BoolVarP(&f.interactive, "interactive", "i", false, "keep stdin open and stream it to the command")
	fl.BoolVarP(&f.tty, "tty", "t", false, "allocate a terminal for the command")
	fl.BoolVarP(&f.detach, "detach", "d", false, "keep the VM running after CMD (or boot it in entrypoint mode without CMD); needs virtkit serve")
	fl.StringSliceVarP(&f.env, "env", "e", nil, "KEY=VALUE for the command (repeatable)")
	fl.StringArrayVarP(&f.volumes, "volume", "v", nil, "HOSTDIR:GUESTDIR[:ro] shared over virtio-fs (repeatable)")
	fl.StringArrayVarP(&f.publish, "publish", "p", nil, "[IP:]HOSTPORT:GUESTPORT TCP forward (repeatable)")
	fl.StringVarP(&f.workdir, "workdir", "w", "", "working folder in the guest (default: the image's)")
	fl.StringVarP(&f.user, "user", "u", "", "user in the guest: name, uid or uid:gid (default: the image's)")
	fl.StringVar(&f.name, "name", "", "VM name (default: run-<random>)")
	fl.IntVar(&f.cpus, "cpus", 0, "vCPUs (default vm.cpus)")
	fl.StringVar(&f.memory, "memory", "", "memory, e.g. 512M or 2G (default vm.memory_mib)")
	fl.StringVar(&f.net, "net", "dhcp", "guest network: dhcp (the userspace LAN) or none")
	fl.StringVar(&f.vmm, "vmm", "", "auto, cloud-hypervisor or qemu (default vm.vmm)")
	fl.StringVar(&f.kernel, "kernel", "", "guest kernel (default vm.kernel, else the one ./build-kernel.sh made)")
	fl.SetInterspersed(false)
	return cmd
}

func runImage(ctx context.Context, e *env, f *runFlags, ref string, argv []string) error {
	cfg := e.cfg
	req := launcher.Request{Name: f.name, CPUs: f.cpus, MemoryMiB: cfg.VM.MemoryMiB, Net: f.net, VMM: f.vmm}
	if f.kernel != "" {
		k, err := filepath.Abs(f.kernel)
		if err != nil {
			return err
		}
		req.Kernel = k
	}
	if req.Name == "" {
		req.Name = "run-" + nonce()
	}
	if req.CPUs == 0 {
		req.CPUs = cfg.VM.CPUs
	}
	if f.memory != "" {
		mib, err := parseMiB(f.memory)
		if err != nil {
			return fmt.Errorf("--memory: %w", err)
		}
		req.MemoryMiB = mib
	}
	if req.CPUs > cfg.VM.MaxCPUs || req.MemoryMiB > cfg.VM.MaxMemoryMiB {
		return fmt.Errorf("run: %d cpus / %d MiB exceeds the configured limits (%d cpus, %d MiB)", req.CPUs, req.MemoryMiB, cfg.VM.MaxCPUs, cfg.VM.MaxMemoryMiB)
	}
	for _, v := range f.volumes {
		sh, err := parseVolume(v)
		if err != nil {
			return err
		}
		req.Shares = append(req.Shares, sh)
	}
	for _, p := range f.publish {
		pf, err := parsePublish(p)
		if err != nil {
			return err
		}
		req.Forwards = append(req.Forwards, pf)
	}
	if len(req.Forwards) > 0 && req.Net == "none" {
		return fmt.Errorf("run: -p needs the network (--net dhcp)")
	}
	if f.detach && len(argv) == 0 {
		req.Mode = "entrypoint"
	}

	sess, err := e.session(ctx)
	if err != nil {
		return err
	}
	defer sess.close()
	if f.detach && sess.oneShot {
		return fmt.Errorf("run -d: no daemon is running to keep the VM; start `virtkit serve` first")
	}
	bundle, err := runConvert(ctx, e, ref, f.img)
	if err != nil {
		return err
	}
	req.Rootfs = bundle.Rootfs
	t0 := time.Now()
	ready, err := launchVM(ctx, sess.c, req)
	if err != nil {
		return &ExitError{Code: 125, Err: fmt.Errorf("run: %w", err)}
	}
	e.log.Debug().Str("vm", req.Name).Str("ip", ready.IP).Dur("boot", time.Since(t0)).Msg("vm ready")
	if f.detach && len(argv) == 0 {
		fmt.Println(req.Name)
		return nil
	}
	host := sess.c.Host()
	stop := func() {
		sctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer cancel()
		if _, err := stopVM(sctx, sess.c, host, req.Name, false); err != nil {
			e.log.Warn().Err(err).Str("vm", req.Name).Msg("stop")
		}
	}
	if !f.detach {
		defer stop()
	}

	url := fmt.Sprintf("hvsock://%s:%d", filepath.Join(cfg.StateDir, "vms", req.Name, "vsock.sock"), addr.PortExec)
	c, err := client.Dial(context.WithoutCancel(ctx), url)
	if err != nil {
		return &ExitError{Code: 125, Err: fmt.Errorf("run: %w", err)}
	}
	defer c.Close()
	ereq := execRequest(bundle.Image, argv, f)
	if len(ereq.Argv) == 0 {
		return &ExitError{Code: 125, Err: fmt.Errorf("run: %s has no entrypoint or cmd; give a command after --", ref)}
	}
	st, err := c.Attach(ctx, ereq, client.Terminal{Stdin: os.Stdin, Stdout: os.Stdout, Stderr: os.Stderr, Interactive: f.interactive})
	if err != nil {
		return &ExitError{Code: client.ExitCode(err), Err: fmt.Errorf("run: %w", err)}
	}
	if f.detach {
		fmt.Fprintln(os.Stderr, req.Name)
	}
	if st.Code != 0 {
		return &ExitError{Code: st.Code}
	}
	return nil
}

// runConvert turns ref into a bundle in this host's store (cached: a hit costs milliseconds).
func runConvert(ctx context.Context, e *env, ref string, f imageFlags) (*store.Bundle, error) {
	agent, err := oci.FindAgent()
	if err != nil {
		return nil, err
	}
	return oci.Convert(ctx, ref, oci.ConvertOptions{Options: f.options(e), Store: filepath.Join(e.cfg.StateDir, "images"), Agent: agent, NoJournal: true})
}

// execRequest is CMD (or the image's entrypoint+cmd) with the image's env, workdir and user, and
// the flags on top.
func execRequest(img store.ImageConfig, argv []string, f *runFlags) client.ExecRequest {
	r := client.ExecRequest{Env: append(append([]string{}, img.Env...), f.env...), Dir: img.WorkingDir, User: img.User, TTY: f.tty}
	if len(argv) > 0 {
		r.Argv = argv
	} else {
		r.Argv = append(append([]string{}, img.Entrypoint...), img.Cmd...)
	}
	if f.workdir != "" {
		r.Dir = f.workdir
	}
	if f.user != "" {
		r.User = f.user
	}
	return r
}

func parseVolume(v string) (launcher.Share, error) {
	parts := strings.Split(v, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" || (len(parts) == 3 && parts[2] != "ro" && parts[2] != "rw") {
		return launcher.Share{}, fmt.Errorf("-v %q: want HOSTDIR:GUESTDIR[:ro]", v)
	}
	host, err := filepath.Abs(parts[0])
	if err != nil {
		return launcher.Share{}, err
	}
	return launcher.Share{HostDir: host, GuestDir: parts[1], ReadOnly: len(parts) == 3 && parts[2] == "ro"}, nil
}

func parsePublish(p string) (launcher.PortForward, error) {
	parts := strings.Split(p, ":")
	if len(parts) == 2 {
		parts = append([]string{"127.0.0.1"}, parts...)
	}
	if len(parts) != 3 {
		return launcher.PortForward{}, fmt.Errorf("-p %q: want [IP:]HOSTPORT:GUESTPORT", p)
	}
	hp, err1 := strconv.ParseUint(parts[1], 10, 16)
	gp, err2 := strconv.ParseUint(parts[2], 10, 16)
	if err1 != nil || err2 != nil || hp == 0 || gp == 0 {
		return launcher.PortForward{}, fmt.Errorf("-p %q: ports must be 1-65535", p)
	}
	return launcher.PortForward{Listen: parts[0] + ":" + parts[1], GuestPort: uint16(gp)}, nil
}

// parseMiB reads 512M, 2G or a plain number of MiB.
func parseMiB(s string) (int, error) {
	s = strings.ToUpper(strings.TrimSuffix(strings.TrimSuffix(strings.TrimSpace(s), "B"), "I"))
	mult := 1
	switch {
	case strings.HasSuffix(s, "G"):
		mult, s = 1024, strings.TrimSuffix(s, "G")
	case strings.HasSuffix(s, "M"):
		s = strings.TrimSuffix(s, "M")
	}
	n, err := strconv.Atoi(s)
	if err != nil || n <= 0 {
		return 0, fmt.Errorf("%q: want e.g. 512M or 2G", s)
	}
	return n * mult, nil
}
