package rootfs

import (
	"archive/tar"
	"errors"
	"fmt"
	"sort"
	"strings"
)

// The merge works on an in-memory tree of metadata only: layer by layer, whiteouts first (they
// hide lower layers only, wherever they sit in the tar), then the additions in archive order with
// tar semantics (a later entry replaces an earlier one; a directory over a directory merges). Paths
// are resolved like a chroot would: a symlinked parent is followed inside the tree and ".." stops at
// the root, so nothing can point outside the image and the output names never cross a symlink.

const (
	whPrefix = ".wh."
	whOpaque = ".wh..wh..opq"
	whMeta   = ".wh..wh." // aufs bookkeeping (.wh..wh.plnk, .wh..wh.aufs): ignored, like Docker does
	maxLinks = 40         // symlinks followed while resolving one path, like Linux's ELOOP bound
	maxName  = 255        // bytes in one path component (ext4's limit)
	maxPath  = 4096
)

type node struct {
	parent *node
	name   string
	kids   map[string]*node // non-nil for directories
	dir    *Entry           // a directory's latest header; nil for an implicit directory
	ino    *inode           // non-directories: the file this name links to
}

// inode is one file of the merged image: the entry whose data it carries and the surviving names.
type inode struct {
	layer, index int
	ent          *Entry
	names        []string
}

func (n *node) isDir() bool { return n.kids != nil }

func (n *node) path() string {
	if n.parent == nil {
		return "."
	}
	var parts []string
	for p := n; p.parent != nil; p = p.parent {
		parts = append(parts, p.name)
	}
	for i, j := 0, len(parts)-1; i < j; i, j = i+1, j-1 {
		parts[i], parts[j] = parts[j], parts[i]
	}
	return strings.Join(parts, "/")
}

type tree struct {
	root    *node
	nodes   int
	max     int
	sources map[[2]int]*inode // (layer, index) of a data-carrying entry -> its inode
}

func newTree(maxEntries int) *tree {
	return &tree{root: &node{kids: map[string]*node{}}, max: maxEntries, sources: map[[2]int]*inode{}}
}

// cleanName turns a tar name into slash-separated components relative to the root, rejecting
// names that climb out with "..".
func cleanName(name string) ([]string, error) {
	if len(name) > maxPath {
		return nil, fmt.Errorf("name of %d bytes is longer than %d", len(name), maxPath)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return nil, errors.New("name contains a NUL byte")
	}
	var parts []string
	for _, p := range strings.Split(name, "/") {
		switch p {
		case "", ".":
			continue
		case "..":
			return nil, errors.New(`name contains ".." (path traversal)`)
		}
		if len(p) > maxName {
			return nil, fmt.Errorf("component of %d bytes is longer than %d", len(p), maxName)
		}
		parts = append(parts, p)
	}
	return parts, nil
}

// lookup resolves components from the root, following symlinks inside the tree (also for the
// final component when follow is set). With create, missing directories are made implicitly.
// It returns nil, nil when a component does not exist and create is false.
func (t *tree) lookup(parts []string, follow, create bool) (*node, error) {
	links := 0
	cur := t.root
	queue := append([]string(nil), parts...)
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		switch p {
		case "", ".":
			continue
		case "..":
			if cur.parent != nil {
				cur = cur.parent
			}
			continue
		}
		if !cur.isDir() {
			return nil, fmt.Errorf("%s is not a directory", cur.path())
		}
		next := cur.kids[p]
		if next == nil {
			if !create {
				return nil, nil
			}
			if err := t.count(); err != nil {
				return nil, err
			}
			next = &node{parent: cur, name: p, kids: map[string]*node{}}
			cur.kids[p] = next
		}
		if next.ino != nil && next.ino.ent.Type == tar.TypeSymlink && (len(queue) > 0 || follow) {
			links++
			if links > maxLinks {
				return nil, fmt.Errorf("too many levels of symbolic links at %s", next.path())
			}
			target := next.ino.ent.Linkname
			if strings.HasPrefix(target, "/") {
				cur = t.root
			}
			queue = append(strings.Split(target, "/"), queue...)
			continue
		}
		cur = next
	}
	return cur, nil
}

func (t *tree) count() error {
	t.nodes++
	if t.nodes > t.max {
		return fmt.Errorf("more than %d files in the merged tree: %w", t.max, ErrLimit)
	}
	return nil
}

// remove unlinks n (and its subtree) from its parent.
func remove(n *node) {
	if n.parent != nil {
		delete(n.parent.kids, n.name)
	}
}

// apply merges one layer's entries into the tree.
func (t *tree) apply(layer int, entries []Entry) error {
	// Whiteouts hide lower layers only, so they go first whatever their place in the archive.
	for i := range entries {
		e := &entries[i]
		parts, err := cleanName(e.Name)
		if err != nil {
			return fmt.Errorf("entry %q: %w", e.Name, err)
		}
		if len(parts) == 0 {
			continue
		}
		base := parts[len(parts)-1]
		if !strings.HasPrefix(base, whPrefix) {
			continue
		}
		if t.under(parts[:len(parts)-1]) {
			continue
		}
		dir, err := t.lookup(parts[:len(parts)-1], true, false)
		if err != nil {
			return fmt.Errorf("whiteout %q: %w", e.Name, err)
		}
		if dir == nil || !dir.isDir() {
			continue
		}
		switch {
		case base == whOpaque:
			for _, k := range dir.kids {
				t.nodes -= subtreeSize(k)
			}
			dir.kids = map[string]*node{}
		case strings.HasPrefix(base, whMeta):
		default:
			if k := dir.kids[strings.TrimPrefix(base, whPrefix)]; k != nil {
				t.nodes -= subtreeSize(k)
				remove(k)
			}
		}
	}
	for i := range entries {
		e := &entries[i]
		parts, _ := cleanName(e.Name)
		if err := t.add(layer, i, e, parts); err != nil {
			return fmt.Errorf("entry %q: %w", e.Name, err)
		}
	}
	return nil
}

// under reports whether a directory path lies inside aufs bookkeeping (".wh..wh.plnk/...").
func (t *tree) under(parts []string) bool {
	for _, p := range parts {
		if strings.HasPrefix(p, whMeta) {
			return true
		}
	}
	return false
}

func subtreeSize(n *node) int {
	s := 1
	for _, k := range n.kids {
		s += subtreeSize(k)
	}
	return s
}

func (t *tree) add(layer, index int, e *Entry, parts []string) error {
	_, _, err := t.place(layer, index, e, parts)
	return err
}

// place adds one entry and returns the node now holding it (nil when the entry changes nothing)
// and, for a hard link, the node it links to.
func (t *tree) place(layer, index int, e *Entry, parts []string) (placed, target *node, err error) {
	if len(parts) == 0 {
		if e.Type != tar.TypeDir {
			return nil, nil, errors.New("the root entry is not a directory")
		}
		t.root.dir = e
		return t.root, nil, nil
	}
	base := parts[len(parts)-1]
	if strings.HasPrefix(base, whPrefix) || t.under(parts[:len(parts)-1]) {
		return nil, nil, nil
	}
	dir, err := t.lookup(parts[:len(parts)-1], true, true)
	if err != nil {
		return nil, nil, err
	}
	if !dir.isDir() {
		return nil, nil, fmt.Errorf("parent %s is not a directory", dir.path())
	}
	old := dir.kids[base]
	switch e.Type {
	case tar.TypeDir:
		if old != nil && old.isDir() {
			old.dir = e
			return old, nil, nil
		}
		n := &node{parent: dir, name: base, kids: map[string]*node{}, dir: e}
		return n, nil, t.replace(dir, old, n)
	case tar.TypeLink:
		tparts, err := cleanName(e.Linkname)
		if err != nil {
			return nil, nil, fmt.Errorf("hard link target %q: %w", e.Linkname, err)
		}
		target, err := t.lookup(tparts, false, false)
		if err != nil {
			return nil, nil, fmt.Errorf("hard link target %q: %w", e.Linkname, err)
		}
		if target == nil {
			return nil, nil, fmt.Errorf("hard link target %q does not exist", e.Linkname)
		}
		if target.isDir() {
			return nil, nil, fmt.Errorf("hard link target %q is a directory", e.Linkname)
		}
		if target == old {
			return nil, nil, nil
		}
		n := &node{parent: dir, name: base, ino: target.ino}
		return n, target, t.replace(dir, old, n)
	case tar.TypeReg, tar.TypeSymlink, tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		ino := &inode{layer: layer, index: index, ent: e}
		t.sources[[2]int{layer, index}] = ino
		n := &node{parent: dir, name: base, ino: ino}
		return n, nil, t.replace(dir, old, n)
	default:
		return nil, nil, fmt.Errorf("unsupported tar entry type %q", e.Type)
	}
}

func (t *tree) replace(dir, old, n *node) error {
	if old != nil {
		t.nodes -= subtreeSize(old)
	}
	if err := t.count(); err != nil {
		return err
	}
	dir.kids[n.name] = n
	return nil
}

// finish walks the merged tree in name order and returns the directories to emit (parents first)
// and records every surviving name on its inode; sources no name survives are dropped.
func (t *tree) finish() []*node {
	var dirs []*node
	var walk func(n *node)
	walk = func(n *node) {
		names := make([]string, 0, len(n.kids))
		for k := range n.kids {
			names = append(names, k)
		}
		sort.Strings(names)
		for _, k := range names {
			c := n.kids[k]
			if c.isDir() {
				dirs = append(dirs, c)
				walk(c)
			} else {
				c.ino.names = append(c.ino.names, c.path())
			}
		}
	}
	walk(t.root)
	for k, ino := range t.sources {
		if len(ino.names) == 0 {
			delete(t.sources, k)
		}
	}
	return dirs
}
