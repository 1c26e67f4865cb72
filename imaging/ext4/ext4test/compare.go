package ext4test

import (
	"bytes"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

var typeNames = map[uint32]string{
	unix.S_IFREG: "regular", unix.S_IFDIR: "directory", unix.S_IFLNK: "symlink",
	unix.S_IFCHR: "character special", unix.S_IFBLK: "block special", unix.S_IFIFO: "FIFO", unix.S_IFSOCK: "socket",
}

// CompareTree checks that img holds exactly the tree at dir, file by file: type, permission
// bits, owner, size, link count, mtime (to the nanosecond), device numbers, xattr names, symlink
// targets and file contents. The image may additionally hold /lost+found and the paths in extra.
func CompareTree(t testing.TB, img, dir string, extra ...string) {
	t.Helper()
	var paths []string
	stats := map[string]*unix.Stat_t{}
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		ip := "/" + filepath.ToSlash(rel)
		if rel == "." {
			ip = "/"
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			return err
		}
		paths = append(paths, ip)
		stats[ip] = &st
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	inodes := Stat(t, img, paths...)
	for i, p := range paths {
		in, st := inodes[i], stats[p]
		if in == nil {
			t.Errorf("%s: missing from the image", p)
			continue
		}
		typ := typeNames[st.Mode&unix.S_IFMT]
		nlink := uint32(st.Nlink)
		if p == "/" {
			nlink++ // the image adds /lost+found
		}
		if in.Type != typ || in.Mode != st.Mode&0o7777 || in.UID != st.Uid || in.GID != st.Gid || in.Links != nlink {
			t.Errorf("%s: image %s %o %d:%d links %d; tree %s %o %d:%d links %d", p,
				in.Type, in.Mode, in.UID, in.GID, in.Links, typ, st.Mode&0o7777, st.Uid, st.Gid, nlink)
		}
		if (typ == "regular" || typ == "symlink") && in.Size != uint64(st.Size) {
			t.Errorf("%s: size %d, tree %d", p, in.Size, st.Size)
		}
		if typ != "symlink" && (in.Mtime.Sec != st.Mtim.Sec || in.Mtime.Nsec != uint32(st.Mtim.Nsec)) {
			t.Errorf("%s: mtime %+v, tree %d.%09d", p, in.Mtime, st.Mtim.Sec, st.Mtim.Nsec)
		}
		if typ == "character special" || typ == "block special" {
			if in.Device != [2]uint32{unix.Major(st.Rdev), unix.Minor(st.Rdev)} {
				t.Errorf("%s: device %v, tree %d:%d", p, in.Device, unix.Major(st.Rdev), unix.Minor(st.Rdev))
			}
		}
		want := xattrNames(filepath.Join(dir, p))
		got := append([]string(nil), in.Xattrs...)
		sort.Strings(got)
		if strings.Join(got, ",") != strings.Join(want, ",") {
			t.Errorf("%s: xattrs %v, tree %v", p, got, want)
		}
	}
	// Contents, through debugfs's own reader.
	out := Rdump(t, img)
	root := filepath.Join(out, "")
	for _, p := range paths {
		st := stats[p]
		src := filepath.Join(dir, p)
		dst := filepath.Join(root, p)
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			a, err1 := os.ReadFile(src)
			b, err2 := os.ReadFile(dst)
			if err1 != nil || err2 != nil || !bytes.Equal(a, b) {
				t.Errorf("%s: content differs (%d vs %d bytes) %v %v", p, len(b), len(a), err1, err2)
			}
		case unix.S_IFLNK:
			a, _ := os.Readlink(src)
			b, err := os.Readlink(dst)
			if err != nil || a != b {
				t.Errorf("%s: symlink target %q, tree %q (%v)", p, b, a, err)
			}
		}
	}
	// Nothing more than the tree.
	allowed := map[string]bool{"/lost+found": true}
	for _, e := range extra {
		allowed[e] = true
	}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		ip := "/" + filepath.ToSlash(rel)
		if rel == "." {
			return nil
		}
		if _, ok := stats[ip]; !ok && !allowed[ip] {
			t.Errorf("%s: in the image, not in the tree", ip)
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

func xattrNames(p string) []string {
	sz, err := unix.Llistxattr(p, nil)
	if err != nil || sz == 0 {
		return nil
	}
	buf := make([]byte, sz)
	sz, _ = unix.Llistxattr(p, buf)
	var out []string
	for _, n := range strings.Split(string(buf[:sz]), "\x00") {
		if n != "" {
			out = append(out, n)
		}
	}
	sort.Strings(out)
	return out
}
