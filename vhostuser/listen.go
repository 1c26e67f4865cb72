package vhostuser

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
)

// Listen creates a listening unix socket at path that is connectable the moment the path
// exists: it binds and listens under a temporary name in the same folder and renames it into
// place, so a VMM started as soon as the file appears never meets the bind→listen gap (QEMU exits
// on a refused connection). A stale socket file is replaced; a live listener or a non-socket is
// an error. The caller removes path when done (closing the listener does not).
func Listen(path string) (*net.UnixListener, error) {
	if c, err := net.Dial("unix", path); err == nil {
		c.Close()
		return nil, fmt.Errorf("listen %s: in use by a live listener", path)
	}
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("listen %s: exists and is not a socket", path)
		}
		os.Remove(path)
	}
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp"+strconv.Itoa(os.Getpid()))
	os.Remove(tmp)
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	l.SetUnlinkOnClose(false)
	if err := os.Rename(tmp, path); err != nil {
		l.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("listen %s: %w", path, err)
	}
	return l, nil
}
