package ext4

import (
	"fmt"
	"path"
	"sort"
	"strings"
)

// File type bits of i_mode.
const (
	sIFMT   = 0o170000
	sIFSOCK = 0o140000
	sIFLNK  = 0o120000
	sIFREG  = 0o100000
	sIFBLK  = 0o060000
	sIFDIR  = 0o040000
	sIFCHR  = 0o020000
	sIFIFO  = 0o010000
)

// timespec is a file time with nanoseconds.
type timespec struct {
	sec  int64
	nsec uint32
}

// extent maps len blocks of file data from logical block lblk to physical block pblk.
type extent struct {
	lblk uint32
	len  uint32
	pblk uint64
}

// xattr is one extended attribute with its ext4 name index and the name without its prefix.
type xattr struct {
	index uint8
	name  string
	value []byte
}

// node is one inode of the tree being built. Several directory entries may point at the same
// node (hard links).
type node struct {
	mode                uint16
	uid, gid            uint32
	atime, mtime, ctime timespec
	size                uint64
	ext                 []extent
	xattrs              []xattr
	target              string // symlink target
	major, minor        uint32
	kids                map[string]*node // directories
	placeholder         bool             // hard link seen before its target

	// Assigned while finishing.
	ino    uint32
	nlink  uint32
	parent *node
	tree   []uint64 // extent tree blocks
	xblock uint64   // shared xattr block, 0 if none or in-inode
	iblock [60]byte // i_block contents
	flags  uint32
}

func (n *node) isDir() bool { return n.mode&sIFMT == sIFDIR }

// fileType is the directory-entry file type code.
func (n *node) fileType() uint8 {
	switch n.mode & sIFMT {
	case sIFREG:
		return 1
	case sIFDIR:
		return 2
	case sIFCHR:
		return 3
	case sIFBLK:
		return 4
	case sIFIFO:
		return 5
	case sIFSOCK:
		return 6
	case sIFLNK:
		return 7
	}
	return 0
}

func newDir(perm uint16) *node {
	return &node{mode: sIFDIR | perm, kids: map[string]*node{}}
}

// tree is the namespace being built: later entries win, nothing escapes the root, hard links may
// name a target that arrives later.
type tree struct {
	root    *node
	pending map[string]*node // hard link targets not yet seen, by clean path
}

func newTree() *tree {
	t := &tree{root: newDir(0o755), pending: map[string]*node{}}
	t.root.kids["lost+found"] = newDir(0o700)
	return t
}

// cleanPath normalises an archive name: relative to the root, no "." or ".." escaping it.
// It returns "" for the root itself.
func cleanPath(name string) (string, error) {
	if strings.IndexByte(name, 0) >= 0 {
		return "", fmt.Errorf("name %q contains a NUL byte", name)
	}
	p := path.Clean("/" + name)
	p = strings.TrimPrefix(p, "/")
	for _, c := range strings.Split(p, "/") {
		if len(c) > 255 {
			return "", fmt.Errorf("name %q: component longer than 255 bytes", name)
		}
	}
	return p, nil
}

// dirFor returns the directory that holds p (clean, not root) and the last component. Parents
// are resolved inside the image like a chroot: a symlink in the path is followed (absolute targets
// start at the image root, ".." stops there), missing directories are created and a
// non-directory in the way is replaced, as an extractor does.
func (t *tree) dirFor(p string) (*node, string, error) {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return t.root, p, nil
	}
	d, err := t.resolve(p[:i], true)
	return d, p[i+1:], err
}

// resolve walks dir (a path inside the image) to a directory node, following symlinks. With
// create it makes what is missing; without, it returns nil for a path that does not exist.
func (t *tree) resolve(dir string, create bool) (*node, error) {
	comps := strings.Split(dir, "/")
	cur := t.root
	var up []*node
	links := 0
	for len(comps) > 0 {
		c := comps[0]
		comps = comps[1:]
		switch c {
		case "", ".":
			continue
		case "..":
			if len(up) > 0 {
				cur, up = up[len(up)-1], up[:len(up)-1]
			}
			continue
		}
		k := cur.kids[c]
		switch {
		case k == nil:
			if !create {
				return nil, nil
			}
			k = newDir(0o755)
			cur.kids[c] = k
		case k.mode&sIFMT == sIFLNK:
			if links++; links > 40 {
				return nil, fmt.Errorf("path %q: too many levels of symbolic links", dir)
			}
			if strings.HasPrefix(k.target, "/") {
				cur, up = t.root, nil
			}
			comps = append(strings.Split(k.target, "/"), comps...)
			continue
		case !k.isDir():
			if !create {
				return nil, nil
			}
			k = newDir(0o755)
			cur.kids[c] = k
		}
		up = append(up, cur)
		cur = k
	}
	return cur, nil
}

// lookup finds p (clean) without creating anything; parents may be symlinks.
func (t *tree) lookup(p string) (*node, error) {
	if p == "" {
		return t.root, nil
	}
	dir, name := t.root, p
	if i := strings.LastIndexByte(p, '/'); i >= 0 {
		d, err := t.resolve(p[:i], false)
		if d == nil || err != nil {
			return nil, err
		}
		dir, name = d, p[i+1:]
	}
	return dir.kids[name], nil
}

// put places n at p. A directory over an existing directory keeps the children and takes the new
// metadata; anything else replaces what was there. It returns the node now at p.
func (t *tree) put(p string, n *node) (*node, error) {
	if p == "" {
		if !n.isDir() {
			return t.root, nil // the root stays a directory
		}
		n.kids = t.root.kids
		*t.root = *n
		return t.root, nil
	}
	if ph := t.pending[p]; ph != nil && !n.isDir() {
		delete(t.pending, p)
		*ph = *n
		n = ph
	}
	dir, name, err := t.dirFor(p)
	if err != nil {
		return nil, err
	}
	if old := dir.kids[name]; old != nil && old.isDir() && n.isDir() {
		kids := old.kids
		*old = *n
		old.kids = kids
		return old, nil
	}
	dir.kids[name] = n
	return n, nil
}

// link makes p another name for target (a hard link); target may arrive later.
func (t *tree) link(p, target string) error {
	n, err := t.lookup(target)
	if err != nil {
		return err
	}
	if n == nil {
		n = t.pending[target]
		if n == nil {
			n = &node{mode: sIFREG, placeholder: true}
			t.pending[target] = n
		}
	}
	if n.isDir() {
		return fmt.Errorf("hard link %q to directory %q", p, target)
	}
	if p == "" {
		return fmt.Errorf("hard link over the root directory")
	}
	dir, name, err := t.dirFor(p)
	if err != nil {
		return err
	}
	dir.kids[name] = n
	return nil
}

// sortedNames returns a directory's entry names in byte order.
func sortedNames(n *node) []string {
	names := make([]string, 0, len(n.kids))
	for k := range n.kids {
		names = append(names, k)
	}
	sort.Strings(names)
	return names
}

// number assigns inode numbers breadth-first (lost+found gets 11, like mke2fs) and link counts,
// and returns the live nodes in inode order from 11. Unreachable nodes keep ino 0.
func (t *tree) number() ([]*node, error) {
	for p := range t.pending {
		return nil, fmt.Errorf("hard link target %q is not in the input", p)
	}
	t.root.ino = 2
	t.root.parent = t.root
	var out []*node
	next := uint32(11)
	if lf := t.root.kids["lost+found"]; lf != nil && lf.isDir() {
		lf.ino = next
		next++
		out = append(out, lf)
	}
	queue := []*node{t.root}
	for len(queue) > 0 {
		d := queue[0]
		queue = queue[1:]
		d.nlink = 2
		for _, name := range sortedNames(d) {
			k := d.kids[name]
			if k.isDir() {
				d.nlink++
				k.parent = d
			} else {
				k.nlink++
				if k.nlink > 65000 {
					return nil, fmt.Errorf("more than 65000 hard links to one file (%q)", name)
				}
			}
			if k.ino == 0 {
				if next == 0 {
					return nil, fmt.Errorf("more than 2^32 inodes")
				}
				k.ino = next
				next++
				out = append(out, k)
			}
			if k.isDir() && k != t.root {
				queue = append(queue, k)
			}
		}
		if d.nlink >= 65000 {
			d.nlink = 1 // dir_nlink: too many subdirectories to count
		}
	}
	return out, nil
}
