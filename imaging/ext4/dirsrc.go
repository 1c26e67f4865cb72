package ext4

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// readDir adds the tree at root. Its content hash covers every entry's path, metadata and
// content in walk order.
//
// The walk and the per-entry system calls (lstat, xattrs, readlink, and reading small files)
// run ahead of the builder on a few goroutines, in a bounded window: on a tree of many small
// files those calls are most of the work, and the builder then only hashes, places and writes,
// in walk order, so the image is the same as a sequential walk's.
func (b *builder) readDir(root string) error {
	st, err := os.Lstat(root)
	if err != nil {
		return fmt.Errorf("read %s: %w", root, err)
	}
	if !st.IsDir() {
		return fmt.Errorf("%s is not a directory", root)
	}
	w := startDirWalk(root)
	defer w.stop()
	links := map[[2]uint64]string{}
	for it := range w.order {
		<-it.ready
		if it.walkErr != nil {
			return it.walkErr
		}
		if err := b.ctx.Err(); err != nil {
			return err
		}
		if it.err != nil {
			return fmt.Errorf("%s: %w", it.path, it.err)
		}
		if err := b.dirEntry(it, links); err != nil {
			return fmt.Errorf("%s: %w", it.path, err)
		}
	}
	return nil
}

// dirItem is one walked entry with what the workers found about it.
type dirItem struct {
	path, p string // host path; image path
	walkErr error  // from the walk itself (returned as is)
	err     error  // from the entry's system calls (returned with the path)
	st      unix.Stat_t
	xs      []xattr
	target  string // symlink target
	data    []byte // a small regular file's content; nil: read it in dirEntry
	ready   chan struct{}
}

const (
	dirWindow   = 128      // entries in flight ahead of the builder (prefetched data: 8 MiB at most)
	dirWorkers  = 2        // goroutines doing the per-entry system calls
	dirPrefetch = 64 << 10 // regular files up to this size are read ahead
)

type dirWalk struct {
	order chan *dirItem
	quit  chan struct{}
	wg    sync.WaitGroup
}

func startDirWalk(root string) *dirWalk {
	w := &dirWalk{order: make(chan *dirItem, dirWindow), quit: make(chan struct{})}
	work := make(chan *dirItem, dirWindow)
	w.wg.Add(1 + dirWorkers)
	go func() { // the walk: items in order to the builder, and to the workers
		defer w.wg.Done()
		defer close(w.order)
		defer close(work)
		errQuit := errors.New("quit")
		filepath.WalkDir(root, func(path string, d fs.DirEntry, err error) error {
			it := &dirItem{path: path, ready: make(chan struct{})}
			if err == nil {
				var rel string
				if rel, err = filepath.Rel(root, path); err == nil {
					it.p, err = cleanPath(filepath.ToSlash(rel))
				}
			}
			if err != nil {
				it.walkErr = err
				close(it.ready)
			}
			select {
			case w.order <- it:
			case <-w.quit:
				return errQuit
			}
			if err != nil {
				return errQuit
			}
			select {
			case work <- it:
			case <-w.quit:
				return errQuit
			}
			return nil
		})
	}()
	for i := 0; i < dirWorkers; i++ {
		go func() {
			defer w.wg.Done()
			for it := range work {
				it.lookup()
				close(it.ready)
			}
		}()
	}
	return w
}

// stop ends the walk early (or after its end) and waits for its goroutines.
func (w *dirWalk) stop() {
	close(w.quit)
	for range w.order { // unblock the walk; the workers finish what they hold
	}
	w.wg.Wait()
}

// lookup makes the entry's system calls.
func (it *dirItem) lookup() {
	if it.err = unix.Lstat(it.path, &it.st); it.err != nil {
		return
	}
	if it.xs, it.err = listXattrs(it.path); it.err != nil {
		return
	}
	switch it.st.Mode & unix.S_IFMT {
	case unix.S_IFLNK:
		it.target, it.err = os.Readlink(it.path)
	case unix.S_IFREG:
		if it.st.Size > dirPrefetch || it.st.Nlink > 1 {
			return // big files stream in dirEntry; hard links may not need their data
		}
		f, err := os.Open(it.path)
		if err != nil {
			it.err = err
			return
		}
		defer f.Close()
		buf := make([]byte, it.st.Size)
		if _, err := io.ReadFull(f, buf); err != nil {
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			it.err = fmt.Errorf("read data: %w", err)
			return
		}
		it.data = buf
	}
}

func (b *builder) dirEntry(it *dirItem, links map[[2]uint64]string) error {
	st, p := &it.st, it.p
	n := &node{
		mode:  uint16(st.Mode & 0o7777),
		uid:   st.Uid,
		gid:   st.Gid,
		mtime: toTimespec(time.Unix(st.Mtim.Sec, st.Mtim.Nsec)),
		ctime: toTimespec(time.Unix(st.Ctim.Sec, st.Ctim.Nsec)),
	}
	n.atime = n.mtime
	xs := it.xs
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
		var r io.Reader
		if it.data != nil {
			r = bytes.NewReader(it.data)
		} else {
			f, err := os.Open(it.path)
			if err != nil {
				return err
			}
			defer f.Close()
			r = f
		}
		if err := b.writeData(n, io.TeeReader(r, b.in), st.Size); err != nil {
			return err
		}
	case unix.S_IFDIR:
		n.mode |= sIFDIR
		n.kids = map[string]*node{}
	case unix.S_IFLNK:
		n.mode |= sIFLNK
		t := it.target
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
