package vmm

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
)

// Accel says how QEMU should run guests on this host and why.
type Accel struct {
	Name   string // "kvm" or "tcg"
	Reason string
}

var accelOnce = sync.OnceValue(detectAccel)

// HostAccel detects once whether KVM can run stock guests here. $VIRTKIT_ACCEL=kvm|tcg overrides.
// A PVM-backed /dev/kvm (module kvm_pvm) runs only PVM guest kernels, so it counts as unusable.
func HostAccel() Accel { return accelOnce() }

func detectAccel() Accel {
	switch v := os.Getenv("VIRTKIT_ACCEL"); v {
	case "kvm", "tcg":
		return Accel{v, "VIRTKIT_ACCEL=" + v}
	}
	if _, err := os.Stat("/sys/module/kvm_pvm"); err == nil {
		return Accel{"tcg", "/dev/kvm is kvm_pvm, which runs no stock guest kernel"}
	}
	fd, err := unix.Open("/dev/kvm", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return Accel{"tcg", "/dev/kvm: " + err.Error()}
	}
	defer unix.Close(fd)
	const kvmGetAPIVersion = 0xAE00
	v, err := unix.IoctlRetInt(fd, kvmGetAPIVersion)
	if err != nil || v != 12 {
		return Accel{"tcg", "/dev/kvm answers no usable KVM API"}
	}
	if !cpuHasVirt() {
		return Accel{"tcg", "no vmx/svm in /proc/cpuinfo"}
	}
	return Accel{"kvm", "/dev/kvm usable"}
}

func cpuHasVirt() bool {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return false
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if strings.HasPrefix(s.Text(), "flags") {
			for _, fl := range strings.Fields(s.Text()) {
				if fl == "vmx" || fl == "svm" {
					return true
				}
			}
			return false
		}
	}
	return false
}

// HostKHz is the host TSC frequency guess from /proc/cpuinfo: microvm under TCG needs
// tsc_early_khz on the kernel command line, or some boots hang calibrating against the PIT.
func HostKHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		k, v, ok := strings.Cut(s.Text(), ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}
