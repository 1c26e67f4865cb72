package addr

import (
	"errors"
	"io/fs"
	"os"
)

// removeSocket deletes a stale socket file, refusing to remove anything that is not a socket.
func removeSocket(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return err
	}
	if fi.Mode()&fs.ModeSocket == 0 {
		return errors.New("not a socket")
	}
	return os.Remove(path)
}
