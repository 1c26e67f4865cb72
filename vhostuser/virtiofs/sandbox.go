package virtiofs

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// SandboxEnv marks the re-executed, sandboxed child; its value is the share path.
const SandboxEnv = "VIRTKIT_VIRTIOFSD_SANDBOX"

// IDMap is one uid or gid mapping of the sandbox's user namespace: Inside..Inside+Count-1 in the
// namespace are Outside..Outside+Count-1 on the host.
type IDMap struct{ Inside, Outside, Count int }

// ParseIDMap parses "inside:outside:count".
func ParseIDMap(s string) (IDMap, error) {
	f := strings.Split(s, ":")
	if len(f) != 3 {
		return IDMap{}, fmt.Errorf("id map %q: want inside:outside:count", s)
	}
	var v [3]int
	for i, x := range f {
		n, err := strconv.Atoi(x)
		if err != nil || n < 0 {
			return IDMap{}, fmt.Errorf("id map %q: %q is not a non-negative number", s, x)
		}
		v[i] = n
	}
	if v[2] == 0 {
		return IDMap{}, fmt.Errorf("id map %q: count is 0", s)
	}
	return IDMap{Inside: v[0], Outside: v[1], Count: v[2]}, nil
}

// SpawnSandboxed re-executes argv (the current program and its arguments) in new mount (and,
// unless running as root, user) namespaces with the listener as fd 3 and SandboxEnv set; the
// child calls EnterSandbox and then serves. It returns when the child exits; ctx ending
// terminates the child.
func SpawnSandboxed(ctx context.Context, share string, l *net.UnixListener, argv []string, uidMap, gidMap []IDMap) error {
	lf, err := l.File()
	if err != nil {
		return fmt.Errorf("virtiofs: sandbox: listener fd: %w", err)
	}
	defer lf.Close()
	self, err := os.Executable()
	if err != nil {
		return fmt.Errorf("virtiofs: sandbox: %w", err)
	}
	cmd := exec.Command(self, argv[1:]...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = nil, os.Stdout, os.Stderr
	cmd.ExtraFiles = []*os.File{lf}
	cmd.Env = append(os.Environ(), SandboxEnv+"="+share)
	attr := &syscall.SysProcAttr{Cloneflags: syscall.CLONE_NEWNS, Pdeathsig: syscall.SIGKILL}
	if os.Geteuid() != 0 {
		attr.Cloneflags |= syscall.CLONE_NEWUSER
		// The daemon must be root inside its namespace to keep the capabilities it needs for
		// the mounts across execve; the caller's own ids are that root.
		if len(uidMap) == 0 {
			uidMap = []IDMap{{Inside: 0, Outside: os.Geteuid(), Count: 1}}
		}
		if len(gidMap) == 0 {
			gidMap = []IDMap{{Inside: 0, Outside: os.Getegid(), Count: 1}}
		}
		for _, m := range uidMap {
			attr.UidMappings = append(attr.UidMappings, syscall.SysProcIDMap{ContainerID: m.Inside, HostID: m.Outside, Size: m.Count})
		}
		for _, m := range gidMap {
			attr.GidMappings = append(attr.GidMappings, syscall.SysProcIDMap{ContainerID: m.Inside, HostID: m.Outside, Size: m.Count})
		}
		attr.GidMappingsEnableSetgroups = false
	} else if len(uidMap) > 0 || len(gidMap) > 0 {
		// Root asked for id maps (e.g. guest root → host user 1000): the daemon runs as root of a
		// new user namespace whose ids are those maps, so what it creates belongs to the mapped
		// host ids. It must be uid/gid 0 inside before execve, or it loses its capabilities there.
		attr.Cloneflags |= syscall.CLONE_NEWUSER
		uidMap, gidMap = withInsideRoot(uidMap), withInsideRoot(gidMap)
		attr.Credential = &syscall.Credential{Uid: 0, Gid: 0, NoSetGroups: true}
		attr.GidMappingsEnableSetgroups = false
		for _, m := range uidMap {
			attr.UidMappings = append(attr.UidMappings, syscall.SysProcIDMap{ContainerID: m.Inside, HostID: m.Outside, Size: m.Count})
		}
		for _, m := range gidMap {
			attr.GidMappings = append(attr.GidMappings, syscall.SysProcIDMap{ContainerID: m.Inside, HostID: m.Outside, Size: m.Count})
		}
	}
	cmd.SysProcAttr = attr
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("virtiofs: start sandboxed daemon: %w", err)
	}
	stop := context.AfterFunc(ctx, func() { cmd.Process.Signal(syscall.SIGTERM) })
	defer stop()
	err = cmd.Wait()
	if ctx.Err() != nil {
		return nil
	}
	if err != nil {
		return fmt.Errorf("virtiofs: sandboxed daemon: %w", err)
	}
	return nil
}

// InheritedListener returns the listener the sandboxing parent passed as fd 3.
func InheritedListener() (*net.UnixListener, error) {
	f := os.NewFile(3, "vhost-user-listener")
	l, err := net.FileListener(f)
	f.Close()
	if err != nil {
		return nil, fmt.Errorf("virtiofs: inherited listener: %w", err)
	}
	ul, ok := l.(*net.UnixListener)
	if !ok {
		l.Close()
		return nil, errors.New("virtiofs: inherited fd 3 is not a unix listener")
	}
	return ul, nil
}

// EnterSandbox makes share the whole file system of this process: it must run in a fresh mount
// namespace (SpawnSandboxed). The share is bind-mounted nosuid,nodev (and read-only with
// readOnly), becomes the root through pivot_root, and the old root is detached, so no host path
// remains reachable. The caller then serves "/".
func EnterSandbox(share string, readOnly bool) error {
	// The file system re-opens inodes through /proc/self/fd; /proc is gone after the pivot.
	if _, err := procSelfFD(); err != nil {
		return fmt.Errorf("virtiofs: sandbox: open /proc/self/fd: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("virtiofs: sandbox: make mounts private: %w", err)
	}
	if err := unix.Mount(share, share, "", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("virtiofs: sandbox: bind %s: %w", share, err)
	}
	flags := uintptr(unix.MS_REMOUNT | unix.MS_BIND | unix.MS_NOSUID | unix.MS_NODEV)
	if readOnly {
		flags |= unix.MS_RDONLY
	}
	if err := unix.Mount("", share, "", flags, ""); err != nil {
		// In a user namespace the original mount's locked flags must be kept; retry with them.
		var st unix.Statfs_t
		if unix.Statfs(share, &st) == nil {
			flags |= uintptr(st.Flags) & (unix.MS_NOEXEC | unix.MS_NOATIME | unix.MS_RELATIME | unix.MS_NODIRATIME)
		}
		if err2 := unix.Mount("", share, "", flags, ""); err2 != nil {
			return fmt.Errorf("virtiofs: sandbox: remount %s nosuid,nodev: %w", share, err)
		}
	}
	if err := unix.Chdir(share); err != nil {
		return fmt.Errorf("virtiofs: sandbox: %w", err)
	}
	if err := unix.PivotRoot(".", "."); err != nil {
		return fmt.Errorf("virtiofs: sandbox: pivot_root: %w", err)
	}
	if err := unix.Unmount(".", unix.MNT_DETACH); err != nil {
		return fmt.Errorf("virtiofs: sandbox: detach old root: %w", err)
	}
	if err := unix.Chdir("/"); err != nil {
		return fmt.Errorf("virtiofs: sandbox: %w", err)
	}
	// Nothing in the share may gain privileges through exec (we never exec, but a bug might).
	unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
	// Modes arrive with the guest's umask applied; the daemon's own must not take more away.
	unix.Umask(0)
	return nil
}

// withInsideRoot adds 0→0 when no map covers id 0 inside, so the daemon can be root there.
func withInsideRoot(ms []IDMap) []IDMap {
	for _, m := range ms {
		if m.Inside == 0 && m.Count > 0 {
			return ms
		}
	}
	return append([]IDMap{{Inside: 0, Outside: 0, Count: 1}}, ms...)
}
