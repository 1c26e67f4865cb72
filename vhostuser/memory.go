package vhostuser

import (
	"fmt"
	"math"
	"slices"

	"golang.org/x/sys/unix"
)

// region is one mapped guest memory region.
type region struct {
	MemRegion
	mapping []byte // the whole mmap (offset 0 .. MmapOffset+Size)
	data    []byte // mapping[MmapOffset:][:Size]
}

// Memory is an immutable view of the guest's memory table. A new table replaces the old one as a
// whole (queues are stopped around the swap), so readers need no lock.
type Memory struct {
	regions []*region // sorted by GuestAddr, non-overlapping
}

// mapRegion mmaps fd for r. It takes ownership of fd (closed once mapped or on error).
func mapRegion(fd int, r MemRegion) (*region, error) {
	defer unix.Close(fd)
	if r.Size == 0 {
		return nil, fmt.Errorf("%w: memory region at %#x has size 0", ErrProtocol, r.GuestAddr)
	}
	end := r.MmapOffset + r.Size
	if end < r.MmapOffset || end > math.MaxInt || r.GuestAddr+r.Size < r.GuestAddr || r.UserAddr+r.Size < r.UserAddr {
		return nil, fmt.Errorf("%w: memory region %#x+%#x (offset %#x) overflows", ErrProtocol, r.GuestAddr, r.Size, r.MmapOffset)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("vhost-user: stat memory fd: %w", err)
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && uint64(st.Size) < end {
		return nil, fmt.Errorf("%w: memory region %#x+%#x needs %d bytes of its fd, which has %d", ErrProtocol, r.GuestAddr, r.Size, end, st.Size)
	}
	m, err := unix.Mmap(fd, 0, int(end), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("vhost-user: mmap memory region %#x+%#x: %w", r.GuestAddr, r.Size, err)
	}
	return &region{MemRegion: r, mapping: m, data: m[r.MmapOffset:end:end]}, nil
}

func (r *region) unmap() {
	if r.mapping != nil {
		unix.Munmap(r.mapping)
		r.mapping, r.data = nil, nil
	}
}

// newMemory builds a table from mapped regions, refusing overlaps in guest or user address space.
func newMemory(rs []*region) (*Memory, error) {
	rs = slices.Clone(rs)
	slices.SortFunc(rs, func(a, b *region) int {
		switch {
		case a.GuestAddr < b.GuestAddr:
			return -1
		case a.GuestAddr > b.GuestAddr:
			return 1
		}
		return 0
	})
	for i := 1; i < len(rs); i++ {
		if rs[i-1].GuestAddr+rs[i-1].Size > rs[i].GuestAddr {
			return nil, fmt.Errorf("%w: memory regions at %#x and %#x overlap", ErrProtocol, rs[i-1].GuestAddr, rs[i].GuestAddr)
		}
	}
	for i := range rs {
		for j := i + 1; j < len(rs); j++ {
			a, b := rs[i], rs[j]
			if a.UserAddr < b.UserAddr+b.Size && b.UserAddr < a.UserAddr+a.Size {
				return nil, fmt.Errorf("%w: memory regions at user addresses %#x and %#x overlap", ErrProtocol, a.UserAddr, b.UserAddr)
			}
		}
	}
	return &Memory{regions: rs}, nil
}

func (m *Memory) unmap() {
	if m == nil {
		return
	}
	for _, r := range m.regions {
		r.unmap()
	}
}

// find returns the region holding guest address gpa.
func (m *Memory) find(gpa uint64) *region {
	rs := m.regions
	lo, hi := 0, len(rs)
	for lo < hi {
		mid := (lo + hi) / 2
		r := rs[mid]
		switch {
		case gpa < r.GuestAddr:
			hi = mid
		case gpa-r.GuestAddr >= r.Size:
			lo = mid + 1
		default:
			return r
		}
	}
	return nil
}

// Slice returns guest memory [gpa, gpa+n) when it lies inside one region.
func (m *Memory) Slice(gpa, n uint64) ([]byte, error) {
	if m == nil {
		return nil, fmt.Errorf("guest address %#x: no memory table", gpa)
	}
	r := m.find(gpa)
	if r == nil {
		return nil, fmt.Errorf("guest address %#x is outside guest memory", gpa)
	}
	off := gpa - r.GuestAddr
	if n > r.Size-off {
		return nil, fmt.Errorf("guest range %#x+%#x crosses the end of its memory region", gpa, n)
	}
	return r.data[off : off+n : off+n], nil
}

// AppendIov appends slices covering guest memory [gpa, gpa+n) to iov; the range may span
// adjacent regions.
func (m *Memory) AppendIov(iov [][]byte, gpa uint64, n uint64) ([][]byte, error) {
	if m == nil {
		return iov, fmt.Errorf("guest address %#x: no memory table", gpa)
	}
	if gpa+n < gpa {
		return iov, fmt.Errorf("guest range %#x+%#x overflows", gpa, n)
	}
	for n > 0 {
		r := m.find(gpa)
		if r == nil {
			return iov, fmt.Errorf("guest range %#x+%#x is outside guest memory", gpa, n)
		}
		off := gpa - r.GuestAddr
		k := min(n, r.Size-off)
		iov = append(iov, r.data[off:off+k:off+k])
		gpa += k
		n -= k
	}
	return iov, nil
}

// fromUser translates a frontend virtual address range (ring addresses) into guest memory.
func (m *Memory) fromUser(ua, n uint64) ([]byte, error) {
	if m == nil {
		return nil, fmt.Errorf("user address %#x: no memory table", ua)
	}
	for _, r := range m.regions {
		if ua >= r.UserAddr && ua-r.UserAddr < r.Size {
			off := ua - r.UserAddr
			if n > r.Size-off {
				return nil, fmt.Errorf("ring %#x+%#x crosses the end of its memory region", ua, n)
			}
			return r.data[off : off+n : off+n], nil
		}
	}
	return nil, fmt.Errorf("ring address %#x is outside guest memory", ua)
}
