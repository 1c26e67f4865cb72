package cli

import (
	"context"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/workers/launcher/vmm"
)

func init() { register(newLaunch) }

// newLaunch boots a standalone VM straight from a kernel and disks, with the console on stdout:
// the lowest layer, for kernels and images that are not virtkit bundles.
func newLaunch(e *env) *cobra.Command {
	var (
		kernel, initramfs, cmdline, vmmName, name, dir string
		disks, roDisks                                 []string
		cpus, mem                                      int
	)
	cmd := &cobra.Command{
		Use:   "launch --kernel K --disk D [flags]",
		Short: "Boot a standalone VM from a kernel and disks, console on stdout",
		Example: `  virtkit launch --kernel dist/vmlinux --ro-disk rootfs.ext4 --cmdline "root=/dev/vda ro init=/bin/sh"
  virtkit launch --kernel dist/vmlinux --initramfs initrd.cpio --cmdline rdinit=/init`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if kernel == "" {
				kernel = defaultKernel(e)
			}
			d, err := vmm.Select(firstNonEmpty(vmmName, e.cfg.VM.VMM))
			if err != nil {
				return err
			}
			if dir == "" {
				dir = filepath.Join(e.cfg.StateDir, "launch", fmt.Sprintf("%s-%d", name, os.Getpid()))
				defer os.RemoveAll(dir)
			}
			spec := vmm.Spec{Name: name, Dir: dir, Kernel: kernel, Initramfs: initramfs, Cmdline: cmdline,
				CPUs: orInt(cpus, e.cfg.VM.CPUs), MemoryMiB: orInt(mem, e.cfg.VM.MemoryMiB)}
			for _, p := range roDisks {
				spec.Disks = append(spec.Disks, vmm.Disk{Path: p, ReadOnly: true})
			}
			for _, p := range disks {
				spec.Disks = append(spec.Disks, vmm.Disk{Path: p})
			}
			ctx := cmd.Context()
			m, err := d.Start(ctx, spec)
			if err != nil {
				return err
			}
			e.log.Info().Str("vmm", d.Name()).Int("pid", m.PID()).Str("dir", dir).Msg("launched")
			go followFile(ctx, spec.ConsoleLog(), os.Stdout, m.Done())
			select {
			case <-m.Done():
			case <-ctx.Done():
				sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				m.Shutdown(sctx)
				cancel()
			}
			time.Sleep(100 * time.Millisecond) // let the follower print the last lines
			return m.Wait()
		},
	}
	f := cmd.Flags()
	f.StringVar(&kernel, "kernel", "", "guest kernel (default: vm.kernel, else dist/vmlinux)")
	f.StringVar(&initramfs, "initramfs", "", "initramfs")
	f.StringVar(&cmdline, "cmdline", "", "extra kernel command line")
	f.StringSliceVar(&disks, "disk", nil, "read-write raw disk (repeatable)")
	f.StringSliceVar(&roDisks, "ro-disk", nil, "read-only raw disk, attached before --disk ones (repeatable)")
	f.IntVar(&cpus, "cpus", 0, "vCPUs")
	f.IntVar(&mem, "memory", 0, "memory in MiB")
	f.StringVar(&vmmName, "vmm", "", "auto, cloud-hypervisor or qemu")
	f.StringVar(&name, "name", "launch", "VM name")
	f.StringVar(&dir, "dir", "", "state folder (default: a fresh one, removed at exit)")
	return cmd
}

// followFile copies what is appended to path to w until done is closed and the file is drained.
func followFile(ctx context.Context, path string, w io.Writer, done <-chan struct{}) {
	var f *os.File
	for f == nil {
		var err error
		if f, err = os.Open(path); err != nil {
			select {
			case <-done:
				return
			case <-ctx.Done():
				return
			case <-time.After(20 * time.Millisecond):
			}
		}
	}
	defer f.Close()
	buf := make([]byte, 32<<10)
	for {
		n, _ := f.Read(buf)
		if n > 0 {
			w.Write(buf[:n])
			continue
		}
		select {
		case <-done:
			io.Copy(w, f)
			return
		case <-ctx.Done():
			return
		case <-time.After(20 * time.Millisecond):
		}
	}
}

// defaultKernel is vm.kernel, else dist/vmlinux beside the virtkit binary or in the working folder.
func defaultKernel(e *env) string { return kernelPath(e.cfg.VM.Kernel) }

// kernelPath is configured, else vmlinux beside the virtkit binary, else dist/vmlinux.
func kernelPath(configured string) string {
	if configured != "" {
		return configured
	}
	if exe, err := os.Executable(); err == nil {
		if p := filepath.Join(filepath.Dir(exe), "vmlinux"); fileExists(p) {
			return p
		}
	}
	return filepath.Join("dist", "vmlinux")
}

func fileExists(p string) bool { _, err := os.Stat(p); return err == nil }

func firstNonEmpty(s ...string) string {
	for _, x := range s {
		if x != "" {
			return x
		}
	}
	return ""
}

func orInt(v, def int) int {
	if v != 0 {
		return v
	}
	return def
}
