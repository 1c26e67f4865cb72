package ext4

import (
	"fmt"
	"io/fs"
	"strconv"
	"strings"
)

// ParseSize reads a byte count with an optional binary unit: "8G", "512M", "1.5G", "4096", "2TiB".
func ParseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	t = strings.TrimSuffix(strings.TrimSuffix(t, "iB"), "B")
	mult := int64(1)
	if t != "" {
		switch t[len(t)-1] {
		case 'k', 'K':
			mult = 1 << 10
		case 'm', 'M':
			mult = 1 << 20
		case 'g', 'G':
			mult = 1 << 30
		case 't', 'T':
			mult = 1 << 40
		}
		if mult != 1 {
			t = t[:len(t)-1]
		}
	}
	v, err := strconv.ParseFloat(t, 64)
	if err != nil || v < 0 || v*float64(mult) > 1<<62 {
		return 0, fmt.Errorf("size %q: want a number of bytes with an optional K, M, G or T suffix", s)
	}
	return int64(v * float64(mult)), nil
}

// ParseInject reads "SRC:DST:MODE" (MODE octal, default 0755 when omitted).
func ParseInject(s string) (Inject, error) {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || parts[1] == "" {
		return Inject{}, fmt.Errorf("inject %q: want SRC:DST[:MODE]", s)
	}
	in := Inject{Src: parts[0], Dst: parts[1], Mode: 0o755}
	if len(parts) == 3 {
		m, err := strconv.ParseUint(parts[2], 8, 32)
		if err != nil || m > 0o7777 {
			return Inject{}, fmt.Errorf("inject %q: mode %q is not octal permission bits", s, parts[2])
		}
		in.Mode = fs.FileMode(m & 0o777)
		if m&0o4000 != 0 {
			in.Mode |= fs.ModeSetuid
		}
		if m&0o2000 != 0 {
			in.Mode |= fs.ModeSetgid
		}
		if m&0o1000 != 0 {
			in.Mode |= fs.ModeSticky
		}
	}
	return in, nil
}
