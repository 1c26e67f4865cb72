package main

import "golang.org/x/sys/unix"

// unixWinsize returns the terminal size of fd as rows, cols.
func unixWinsize(fd int) ([2]uint16, error) {
	ws, err := unix.IoctlGetWinsize(fd, unix.TIOCGWINSZ)
	if err != nil {
		return [2]uint16{}, err
	}
	return [2]uint16{ws.Row, ws.Col}, nil
}
