package ext4

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"time"

	"golang.org/x/sys/unix"
)

// readDir adds the tree at root. Its content hash covers every entry's path, metadata and
// content in walk order.
func (b *builder) readDir(root string) error {
	st, err := os.Lstat(root)
	if err != nil {
		return fmt.Errorf("read %s: %w", root, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", root)
	}
	links := map[[2]uint64]string{}
	return filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if err := b.ctx.Err(); err != nil {
			return err
		}
		rel, err := filepath.Rel(root, path)
		if err != nil {
			return err
		}
		p, err := cleanPath(filepath.ToSlash(rel))
		if err != nil {
			return err
		}
		if err := b.dirEntry(path, p, links); err != nil {
			return fmt.Errorf("%s: %w", path, err)
		}
		return nil
	})
}

func (b *builder) dirEntry(path, p string, links map[[2]uint64]string) error {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return err
	}
	n := &node{
		mode:  uint16(st.Mode & 0o7777),
		uid:   st.Uid,
		gid:   st.Gid,
		mtime: toTimespec(time.Unix(st.Mtim.Sec, st.Mtim.Nsec)),
		ctime: toTimespec(time.Unix(st.Ctim.Sec, st.Ctim.Nsec)),
	}
	n.atime = n.mtime
	xs, err := listXattrs(path)
	if err != nil {
		return err
	}
	fmt.Fprintf(b.in, "entry %q %o %d %d %d.%d %d.%d %d\n", p, st.Mode, st.Uid, st.Gid,
		n.mtime.sec, n.mtime.nsec, n.ctime.sec, n.ctime.nsec, st.Rdev)
	for _, x := range xs {
		fmt.Fprintf(b.in, "xattr %d %q %q\n", x.index, x.name, x.value)
	}
	n.xattrs = xs
	mode := st.Mode & unix.S_IFMT
	if mode != unix.S_IFDIR && st.Nlink > 1 {
		key := [2]uint64{st.Dev, st.Ino}
		if first, ok := links[key]; ok {
			fmt.Fprintf(b.in, "link %q\n", first)
			return b.t.link(p, first)
		}
		links[key] = p
	}
	switch mode {
	case unix.S_IFREG:
		n.mode |= sIFREG
		f, err := os.Open(path)
		if err != nil {
			return err
		}
		defer f.Close()
		if err := b.writeData(n, io.TeeReader(f, b.in), st.Size); err != nil {
			return err
		}
	case unix.S_IFDIR:
		n.mode |= sIFDIR
		n.kids = map[string]*node{}
	case unix.S_IFLNK:
		n.mode |= sIFLNK
		t, err := os.Readlink(path)
		if err != nil {
			return err
		}
		if t == "" || len(t) >= blockSize {
			return errors.New("bad symlink target")
		}
		fmt.Fprintf(b.in, "target %q\n", t)
		n.target = t
		n.mode |= 0o777
	case unix.S_IFCHR, unix.S_IFBLK:
		n.mode |= uint16(mode)
		n.major, n.minor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
	case unix.S_IFIFO:
		n.mode |= sIFIFO
	case unix.S_IFSOCK:
		n.mode |= sIFSOCK
	default:
		return fmt.Errorf("unsupported file type %o", mode)
	}
	return b.put(p, n)
}

// listXattrs reads a file's extended attributes without following symlinks.
func listXattrs(path string) ([]xattr, error) {
	sz, err := unix.Llistxattr(path, nil)
	if err != nil {
		if errors.Is(err, unix.ENOTSUP) {
			return nil, nil
		}
		return nil, fmt.Errorf("list xattrs: %w", err)
	}
	if sz == 0 {
		return nil, nil
	}
	buf := make([]byte, sz)
	sz, err = unix.Llistxattr(path, buf)
	if err != nil {
		return nil, fmt.Errorf("list xattrs: %w", err)
	}
	names := splitNul(buf[:sz])
	sort.Strings(names)
	var out []xattr
	for _, name := range names {
		vs, err := unix.Lgetxattr(path, name, nil)
		if err != nil {
			if errors.Is(err, unix.ENODATA) {
				continue
			}
			return nil, fmt.Errorf("get xattr %s: %w", name, err)
		}
		v := make([]byte, vs)
		vs, err = unix.Lgetxattr(path, name, v)
		if err != nil {
			return nil, fmt.Errorf("get xattr %s: %w", name, err)
		}
		x, ok, err := newXattr(name, v[:vs])
		if err != nil {
			return nil, err
		}
		if ok {
			out = append(out, x)
		}
	}
	return sortXattrs(out), nil
}

func splitNul(b []byte) []string {
	var out []string
	for len(b) > 0 {
		i := 0
		for i < len(b) && b[i] != 0 {
			i++
		}
		if i > 0 {
			out = append(out, string(b[:i]))
		}
		if i < len(b) {
			i++
		}
		b = b[i:]
	}
	return out
}
