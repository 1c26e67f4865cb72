package initproc

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// Mount is one filesystem the init sets up; the boot sequence is written as data.
type Mount struct {
	Source, Target, FSType string
	Flags                  uintptr
	Data                   string
	Mode                   fs.FileMode // of the target folder if it must be created
	Optional               bool        // failure is logged, not fatal (e.g. cgroup2 on old kernels)
}

// earlyMounts come before the root is assembled (the overlay needs /proc and /dev).
var earlyMounts = []Mount{
	{Source: "proc", Target: "/proc", FSType: "proc", Flags: unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, Mode: 0o555},
	{Source: "devtmpfs", Target: "/dev", FSType: "devtmpfs", Flags: unix.MS_NOSUID, Data: "mode=0755", Mode: 0o755},
}

// lateMounts complete the tree on the final root.
var lateMounts = []Mount{
	{Source: "sysfs", Target: "/sys", FSType: "sysfs", Flags: unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, Mode: 0o555},
	{Source: "cgroup2", Target: "/sys/fs/cgroup", FSType: "cgroup2", Flags: unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC, Optional: true},
	{Source: "devpts", Target: "/dev/pts", FSType: "devpts", Flags: unix.MS_NOSUID | unix.MS_NOEXEC, Data: "newinstance,ptmxmode=0666,mode=0620,gid=5", Mode: 0o755},
	{Source: "shm", Target: "/dev/shm", FSType: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=1777", Mode: 0o1777},
	{Source: "tmpfs", Target: "/run", FSType: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=0755", Mode: 0o755},
	{Source: "tmpfs", Target: "/tmp", FSType: "tmpfs", Flags: unix.MS_NOSUID | unix.MS_NODEV, Data: "mode=1777", Mode: 0o1777},
}

// devLinks are the /dev symlinks a devtmpfs does not provide.
var devLinks = [][2]string{
	{"/proc/self/fd", "/dev/fd"},
	{"/proc/self/fd/0", "/dev/stdin"},
	{"/proc/self/fd/1", "/dev/stdout"},
	{"/proc/self/fd/2", "/dev/stderr"},
	{"/proc/kcore", "/dev/core"},
}

// mounted reports the mount points currently in /proc/self/mountinfo.
func mounted() map[string]string {
	m := map[string]string{}
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		return m
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		// id parent major:minor root mountpoint options ... - fstype source superopts
		if len(fields) < 10 {
			continue
		}
		for i := 6; i < len(fields)-1; i++ {
			if fields[i] == "-" {
				m[unescapeMount(fields[4])] = fields[i+1]
				break
			}
		}
	}
	return m
}

func unescapeMount(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v int
			if _, err := fmt.Sscanf(s[i+1:i+4], "%o", &v); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// do mounts every entry that is not already mounted, creating targets as needed.
func (in *Init) do(ms []Mount) error {
	for _, m := range ms {
		// Re-read each time: /proc itself is among the first mounts.
		if fstype, ok := mounted()[m.Target]; ok && fstype == m.FSType {
			continue
		}
		err := mountOne(m)
		if err != nil {
			if m.Optional {
				in.log("mount %s on %s skipped: %v", m.FSType, m.Target, err)
				continue
			}
			return err
		}
	}
	return nil
}

func mountOne(m Mount) error {
	if err := os.MkdirAll(m.Target, m.Mode|0o700); err != nil && !errors.Is(err, fs.ErrExist) {
		return fmt.Errorf("mount %s: create %s: %w", m.FSType, m.Target, err)
	}
	if err := unix.Mount(m.Source, m.Target, m.FSType, m.Flags, m.Data); err != nil {
		if errors.Is(err, unix.EBUSY) {
			// Already mounted: the kernel mounts devtmpfs itself (DEVTMPFS_MOUNT) before /proc
			// exists to tell us so.
			return nil
		}
		return fmt.Errorf("mount %s on %s: %w", m.FSType, m.Target, err)
	}
	return nil
}

func makeDevLinks() {
	for _, l := range devLinks {
		if _, err := os.Lstat(l[1]); err == nil {
			continue
		}
		_ = os.Symlink(l[0], l[1])
	}
	// With a devpts instance of our own, /dev/ptmx must point into it.
	if fi, err := os.Lstat("/dev/ptmx"); err != nil || fi.Mode()&fs.ModeSymlink == 0 {
		_ = os.Remove("/dev/ptmx")
		_ = os.Symlink("pts/ptmx", "/dev/ptmx")
	}
}

// mountVolume mounts an ext4 data disk, waiting up to 5 s for its device.
func mountVolume(v Volume) error {
	if err := waitDevice(v.Dev, 500); err != nil {
		return fmt.Errorf("volume %s: device did not appear: %w", v.Dev, err)
	}
	flags := uintptr(unix.MS_NOATIME)
	if v.RO {
		flags |= unix.MS_RDONLY
	}
	if err := mountOne(Mount{Source: v.Dev, Target: v.Path, FSType: "ext4", Flags: flags, Mode: 0o755}); err != nil {
		return fmt.Errorf("volume %s: %w", v.Dev, err)
	}
	return nil
}

// waitDevice waits for a block device node to appear (virtio probing runs concurrently with init).
func waitDevice(path string, tries int) error {
	var err error
	for range tries {
		if _, err = os.Stat(path); err == nil {
			return nil
		}
		unix.Nanosleep(&unix.Timespec{Nsec: 10e6}, nil)
	}
	return err
}

// writeEtc writes a generated /etc file. On a read-only root it writes under /run/virtkit/etc and
// bind-mounts the result over the image's file, if the image has one.
func writeEtc(name string, data []byte) error {
	target := filepath.Join("/etc", name)
	err := os.WriteFile(target, data, 0o644)
	if err == nil || (!errors.Is(err, unix.EROFS) && !errors.Is(err, fs.ErrPermission)) {
		if err != nil && errors.Is(err, fs.ErrNotExist) {
			if os.MkdirAll("/etc", 0o755) == nil {
				err = os.WriteFile(target, data, 0o644)
			}
		}
		return err
	}
	alt := filepath.Join("/run/virtkit/etc", name)
	if err := os.MkdirAll(filepath.Dir(alt), 0o755); err != nil {
		return err
	}
	if err := os.WriteFile(alt, data, 0o644); err != nil {
		return err
	}
	if _, err := os.Stat(target); err != nil {
		return fmt.Errorf("write %s: read-only root and no file to bind over", target)
	}
	return unix.Mount(alt, target, "", unix.MS_BIND, "")
}
