package virtiofs

import (
	"strings"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
)

// guard wraps the file system with the share's policy, whatever the sandbox: read-only shares
// refuse every mutation, xattrs are off unless enabled and privileged ones are refused, ioctls
// never reach host files, --cache never opens files for direct I/O. Names and file types the
// guest may not use are the pass-through file system's own checks (badName, Mknod, open).
type guard struct {
	fuse.RawFileSystem
	readOnly bool
	xattr    bool
	directIO bool // --cache never: file data bypasses the guest's page cache
}

func (g *guard) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Mknod(cancel, in, name, out)
}

func (g *guard) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Mkdir(cancel, in, name, out)
}

func (g *guard) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Unlink(cancel, h, name)
}

func (g *guard) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Rmdir(cancel, h, name)
}

func (g *guard) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Rename(cancel, in, oldName, newName)
}

func (g *guard) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Link(cancel, in, name, out)
}

func (g *guard) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	if strings.ContainsRune(target, 0) || len(target) > 4095 {
		return fuse.EINVAL
	}
	return g.RawFileSystem.Symlink(cancel, h, target, name, out)
}

func (g *guard) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	st := g.RawFileSystem.Create(cancel, in, name, out)
	if st.Ok() && g.directIO {
		out.OpenFlags |= fuse.FOPEN_DIRECT_IO
	}
	return st
}

func (g *guard) Tmpfile(cancel <-chan struct{}, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Tmpfile(cancel, in, out)
}

const writeFlags = syscall.O_WRONLY | syscall.O_RDWR | syscall.O_TRUNC | syscall.O_APPEND | syscall.O_CREAT

func (g *guard) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	if g.readOnly && in.Flags&writeFlags != 0 {
		return fuse.EROFS
	}
	st := g.RawFileSystem.Open(cancel, in, out)
	if st.Ok() && g.directIO {
		out.OpenFlags |= fuse.FOPEN_DIRECT_IO
	}
	return st
}

func (g *guard) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.SetAttr(cancel, in, out)
}

func (g *guard) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	if g.readOnly {
		return 0, fuse.EROFS
	}
	return g.RawFileSystem.Writev(cancel, in, data)
}

func (g *guard) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	if g.readOnly {
		return fuse.EROFS
	}
	return g.RawFileSystem.Fallocate(cancel, in)
}

func (g *guard) CopyFileRange(cancel <-chan struct{}, in *fuse.CopyFileRangeIn) (uint32, fuse.Status) {
	if g.readOnly {
		return 0, fuse.EROFS
	}
	return g.RawFileSystem.CopyFileRange(cancel, in)
}

func (g *guard) Ioctl(cancel <-chan struct{}, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	return fuse.ENOSYS // ioctls would reach the host file's driver
}

func (g *guard) GetXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string, dest []byte) (uint32, fuse.Status) {
	if !g.xattr {
		return 0, fuse.ENOSYS
	}
	return g.RawFileSystem.GetXAttr(cancel, h, attr, dest)
}

func (g *guard) ListXAttr(cancel <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	if !g.xattr {
		return 0, fuse.ENOSYS
	}
	return g.RawFileSystem.ListXAttr(cancel, h, dest)
}

// privilegedXattr names attributes a guest must not set on host files: file capabilities would
// give a program in the share privileges on the host, and trusted.* is read by host services
// (overlayfs keeps its metadata there).
func privilegedXattr(attr string) bool {
	return attr == "security.capability" || strings.HasPrefix(attr, "trusted.")
}

func (g *guard) SetXAttr(cancel <-chan struct{}, in *fuse.SetXAttrIn, attr string, data []byte) fuse.Status {
	if !g.xattr {
		return fuse.ENOSYS
	}
	if g.readOnly {
		return fuse.EROFS
	}
	if privilegedXattr(attr) {
		return fuse.EPERM
	}
	return g.RawFileSystem.SetXAttr(cancel, in, attr, data)
}

func (g *guard) RemoveXAttr(cancel <-chan struct{}, h *fuse.InHeader, attr string) fuse.Status {
	if !g.xattr {
		return fuse.ENOSYS
	}
	if g.readOnly {
		return fuse.EROFS
	}
	if privilegedXattr(attr) {
		return fuse.EPERM
	}
	return g.RawFileSystem.RemoveXAttr(cancel, h, attr)
}
