package initproc

import (
	"os"
	"slices"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// machineInit reports whether this is a machine's real PID 1 (a VM), not PID 1 of a pid
// namespace: only then do reboot() and superblock remounts affect just our own machine.
func machineInit() bool {
	if os.Getpid() != 1 {
		return false
	}
	b, err := os.ReadFile("/proc/2/stat")
	return err == nil && strings.Contains(string(b), "(kthreadd)")
}

// finish stops every process, syncs, unmounts and powers off (or reboots). Outside PID 1 (or
// with NoSwitch) it returns the exit code instead.
func (in *Init) finish(poweroff bool, code int) int {
	pid1 := os.Getpid() == 1
	if pid1 {
		in.log("stopping all processes")
		in.killAll(unix.SIGTERM, 5*time.Second)
		in.killAll(unix.SIGKILL, 2*time.Second)
	}
	unix.Sync()
	in.unmountAll()
	unix.Sync()
	if !pid1 || in.opt.NoSwitch {
		in.log("stopped (exit %d)", code)
		return code
	}
	cmd := unix.LINUX_REBOOT_CMD_POWER_OFF
	what := "power off"
	if !poweroff || in.cfg.Poweroff == "reboot" {
		// virtkit.poweroff=reboot: machines without ACPI stop on reboot (kernel reboot=t, QEMU -no-reboot).
		cmd, what = unix.LINUX_REBOOT_CMD_RESTART, "reboot"
	}
	in.log("%s", what)
	err := unix.Reboot(cmd)
	// Only reached on failure (in a pid namespace the kernel ends us instead).
	in.log("%s failed: %v", what, err)
	return code
}

// killAll signals every process but us and waits (reaping) until none is left or grace passes.
func (in *Init) killAll(sig unix.Signal, grace time.Duration) {
	if err := unix.Kill(-1, sig); err == unix.ESRCH {
		return
	}
	deadline := time.Now().Add(grace)
	for time.Now().Before(deadline) {
		if !othersAlive() {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// othersAlive reports whether any process other than PID 1 and kernel threads is alive
// (zombies not reaped yet count as alive: the reaper will collect them).
func othersAlive() bool {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return false
	}
	self := os.Getpid()
	for _, e := range ents {
		pid := 0
		for _, c := range e.Name() {
			if c < '0' || c > '9' {
				pid = -1
				break
			}
			pid = pid*10 + int(c-'0')
		}
		if pid <= 0 || pid == self {
			continue
		}
		// Kernel threads have an empty cmdline and are children of kthreadd (2).
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) > 1 && (f[1] == "2" || pid == 2) {
			continue
		}
		return true
	}
	return false
}

// unmountAll unmounts everything below / (deepest first), then makes what remains read-only.
func (in *Init) unmountAll() {
	m := mounted()
	var points []string
	for p := range m {
		points = append(points, p)
	}
	sort.Slice(points, func(i, j int) bool {
		return strings.Count(points[i], "/") > strings.Count(points[j], "/") || (strings.Count(points[i], "/") == strings.Count(points[j], "/") && points[i] > points[j])
	})
	keep := []string{"/", "/proc", "/dev", "/sys"}
	real := machineInit()
	for _, p := range points {
		if slices.Contains(keep, p) {
			continue
		}
		if err := unix.Unmount(p, 0); err != nil {
			if real || strings.HasPrefix(p, "/run/virtkit/") {
				// Busy (the overlay's layers, a share still open): at least make it clean.
				_ = unix.Mount("", p, "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
			}
		}
	}
	if real {
		_ = unix.Mount("", "/", "", unix.MS_REMOUNT|unix.MS_RDONLY, "")
	}
}
