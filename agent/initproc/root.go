package initproc

import (
	"fmt"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Where the writable layer and the read-only base are visible once the root is assembled.
const (
	stage    = "/run/virtkit"
	rwDir    = stage + "/rw"
	lowerDir = stage + "/lower"
	newRoot  = stage + "/root"
)

// assembleRoot stacks the writable layer (a block device, or tmpfs) over the read-only base with
// overlayfs and makes the result the root, switch_root style (MS_MOVE onto / and chroot), so it
// works whatever the kernel mounted as the first root. /proc and /dev move along.
func (in *Init) assembleRoot() error {
	src := in.cfg.Overlay
	if err := mountOne(Mount{Source: "tmpfs", Target: "/run", FSType: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=0755", Mode: 0o755}); err != nil {
		return fmt.Errorf("overlay root: %w", err)
	}
	for _, d := range []string{rwDir, lowerDir, newRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("overlay root: %w", err)
		}
	}
	if src == "tmpfs" {
		if err := unix.Mount("tmpfs", rwDir, "tmpfs", 0, "mode=0755"); err != nil {
			return fmt.Errorf("overlay root: mount tmpfs layer: %w", err)
		}
	} else {
		if err := waitDevice(src, 500); err != nil {
			return fmt.Errorf("overlay root: writable disk %s did not appear: %w", src, err)
		}
		if err := unix.Mount(src, rwDir, in.cfg.OverlayFS, unix.MS_NOATIME, ""); err != nil {
			return fmt.Errorf("overlay root: mount %s (%s) on %s: %w", src, in.cfg.OverlayFS, rwDir, err)
		}
	}
	upper, work := filepath.Join(rwDir, "upper"), filepath.Join(rwDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return fmt.Errorf("overlay root: %w", err)
		}
	}
	// The base: a non-recursive bind of the current root, so /proc, /dev and /run stay out of it.
	if err := unix.Mount("/", lowerDir, "", unix.MS_BIND, ""); err != nil {
		return fmt.Errorf("overlay root: bind base: %w", err)
	}
	_ = unix.Mount("", lowerDir, "", unix.MS_REMOUNT|unix.MS_BIND|unix.MS_RDONLY, "")
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", lowerDir, upper, work)
	if err := unix.Mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("overlay root: mount overlay (%s): %w", opts, err)
	}
	// Carry the layer mounts into the new root's own /run, so shutdown can reach them.
	nr := func(p string) string { return filepath.Join(newRoot, p) }
	if err := mountOne(Mount{Source: "tmpfs", Target: nr("/run"), FSType: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=0755", Mode: 0o755}); err != nil {
		return fmt.Errorf("overlay root: %w", err)
	}
	for _, d := range []string{rwDir, lowerDir} {
		if err := os.MkdirAll(nr(d), 0o755); err != nil {
			return fmt.Errorf("overlay root: %w", err)
		}
		if err := unix.Mount(d, nr(d), "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("overlay root: move %s: %w", d, err)
		}
	}
	for _, d := range []string{"/proc", "/dev"} {
		if err := os.MkdirAll(nr(d), 0o755); err != nil {
			return fmt.Errorf("overlay root: %w", err)
		}
		if err := unix.Mount(d, nr(d), "", unix.MS_MOVE, ""); err != nil {
			return fmt.Errorf("overlay root: move %s: %w", d, err)
		}
	}
	if err := unix.Chdir(newRoot); err != nil {
		return fmt.Errorf("overlay root: %w", err)
	}
	if err := unix.Mount(".", "/", "", unix.MS_MOVE, ""); err != nil {
		return fmt.Errorf("overlay root: switch root: %w", err)
	}
	if err := unix.Chroot("."); err != nil {
		return fmt.Errorf("overlay root: chroot: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("overlay root: %w", err)
	}
	return nil
}
