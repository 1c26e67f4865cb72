// Package archive moves file trees in and out of the guest as tar streams: Pack writes a file or a
// folder as tar, Unpack extracts a tar stream under a folder. Extraction goes through os.Root, so
// no entry — by "..", an absolute name or a symlink planted earlier in the same stream — can write
// outside the destination.
//
// Concurrency: the functions are independent; a tree being packed or unpacked concurrently by
// someone else gives an undefined but safe result.
package archive

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Pack writes src (a file, symlink or folder) to w as a tar stream. Entry names start with
// base(src), like tar -C dir(src) -c base(src).
func Pack(w io.Writer, src string) error {
	src = filepath.Clean(src)
	if _, err := os.Lstat(src); err != nil {
		return fmt.Errorf("archive: pack %s: %w", src, err)
	}
	parent, base := filepath.Split(src)
	if base == "" || base == "/" {
		parent, base = "/", "."
	}
	tw := tar.NewWriter(w)
	links := map[[2]uint64]string{}
	err := filepath.WalkDir(filepath.Join(parent, base), func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(parent, p)
		if err != nil {
			return err
		}
		var target string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if target, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, target)
		if err != nil {
			return err
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() && hdr.Name != "." {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.Format = tar.FormatPAX
		if st, ok := fi.Sys().(*syscall.Stat_t); ok && fi.Mode().IsRegular() && st.Nlink > 1 {
			key := [2]uint64{st.Dev, st.Ino}
			if first, ok := links[key]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[key] = hdr.Name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return err
		}
		if hdr.Typeflag != tar.TypeReg {
			return nil
		}
		f, err := os.Open(p)
		if err != nil {
			return err
		}
		defer f.Close()
		if _, err := io.CopyN(tw, f, hdr.Size); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("archive: pack %s: %w", src, err)
	}
	if err := tw.Close(); err != nil {
		return fmt.Errorf("archive: pack %s: %w", src, err)
	}
	return nil
}

// Unpack extracts the tar stream r under the folder dst, creating dst if needed. Ownership is
// restored when running as root. It stops at the first bad or unsupported entry and says which.
func Unpack(r io.Reader, dst string) error {
	if err := os.MkdirAll(dst, 0o755); err != nil {
		return fmt.Errorf("archive: unpack into %s: %w", dst, err)
	}
	root, err := os.OpenRoot(dst)
	if err != nil {
		return fmt.Errorf("archive: unpack into %s: %w", dst, err)
	}
	defer root.Close()
	tr := tar.NewReader(r)
	asRoot := os.Geteuid() == 0
	type dirTime struct {
		name string
		t    time.Time
	}
	var dirs []dirTime
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return fmt.Errorf("archive: unpack into %s: %w", dst, err)
		}
		name, err := entryName(hdr.Name)
		if err != nil {
			return fmt.Errorf("archive: unpack into %s: %w", dst, err)
		}
		if err := unpackEntry(root, tr, hdr, name, asRoot); err != nil {
			return fmt.Errorf("archive: unpack %s into %s: %w", hdr.Name, dst, err)
		}
		if hdr.Typeflag == tar.TypeDir {
			dirs = append(dirs, dirTime{name, hdr.ModTime})
		}
	}
	// Folder times last: extracting their content changed them.
	for i := len(dirs) - 1; i >= 0; i-- {
		_ = root.Chtimes(dirs[i].name, dirs[i].t, dirs[i].t)
	}
	return nil
}

// entryName cleans a tar entry name into a path relative to the destination.
func entryName(n string) (string, error) {
	c := path.Clean("/" + strings.ReplaceAll(n, "\\", "/"))
	if c == "/" {
		return ".", nil
	}
	if strings.Contains(n, "\x00") {
		return "", fmt.Errorf("entry name %q has a NUL byte", n)
	}
	return c[1:], nil
}

func unpackEntry(root *os.Root, tr io.Reader, hdr *tar.Header, name string, asRoot bool) error {
	mode := fs.FileMode(hdr.Mode & 0o7777)
	if dir := path.Dir(name); dir != "." {
		if err := root.MkdirAll(dir, 0o755); err != nil {
			return err
		}
	}
	switch hdr.Typeflag {
	case tar.TypeDir:
		if err := root.MkdirAll(name, 0o755); err != nil {
			return err
		}
		if err := root.Chmod(name, mode|fs.ModeDir); err != nil && name != "." {
			return err
		}
	case tar.TypeReg:
		if fi, err := root.Lstat(name); err == nil && !fi.Mode().IsRegular() {
			if err := root.RemoveAll(name); err != nil {
				return err
			}
		}
		f, err := root.OpenFile(name, os.O_CREATE|os.O_TRUNC|os.O_WRONLY, 0o600)
		if err != nil {
			return err
		}
		if _, err := io.Copy(f, tr); err != nil {
			f.Close()
			return err
		}
		if err := f.Chmod(mode); err != nil {
			f.Close()
			return err
		}
		if asRoot {
			if err := f.Chown(hdr.Uid, hdr.Gid); err != nil {
				f.Close()
				return err
			}
			// chown clears set-id bits; put them back.
			if err := f.Chmod(mode); err != nil {
				f.Close()
				return err
			}
		}
		if err := f.Close(); err != nil {
			return err
		}
		_ = root.Chtimes(name, hdr.AccessTime, hdr.ModTime)
		return nil
	case tar.TypeSymlink:
		if err := root.RemoveAll(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		if err := root.Symlink(hdr.Linkname, name); err != nil {
			return err
		}
	case tar.TypeLink:
		target, err := entryName(hdr.Linkname)
		if err != nil {
			return err
		}
		if err := root.RemoveAll(name); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		return root.Link(target, name)
	case tar.TypeXGlobalHeader:
		return nil
	default:
		return fmt.Errorf("unsupported entry type %q", hdr.Typeflag)
	}
	if asRoot {
		return root.Lchown(name, hdr.Uid, hdr.Gid)
	}
	return nil
}
