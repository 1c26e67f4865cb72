package execserver

import (
	"fmt"
	"os/user"
	"strconv"
	"strings"
	"syscall"
)

// identity is who a session runs as.
type identity struct {
	cred *syscall.Credential // nil: as the agent itself
	name string
	home string
}

// resolveUser understands "", "name", "uid", "name:group", "uid:gid" (Docker's USER syntax).
func resolveUser(spec string) (identity, error) {
	if spec == "" {
		return identity{name: "root", home: homeOf("0", "/root")}, nil
	}
	us, gs, hasGroup := strings.Cut(spec, ":")
	id := identity{home: "/"}
	var uid, gid uint32
	var u *user.User
	if n, err := strconv.ParseUint(us, 10, 32); err == nil {
		uid = uint32(n)
		u, _ = user.LookupId(us)
		gid = uid
	} else {
		u, err = user.Lookup(us)
		if err != nil {
			return identity{}, fmt.Errorf("user %q: %w", us, err)
		}
		n, _ := strconv.ParseUint(u.Uid, 10, 32)
		uid = uint32(n)
	}
	if u != nil {
		id.name, id.home = u.Username, u.HomeDir
		n, _ := strconv.ParseUint(u.Gid, 10, 32)
		gid = uint32(n)
	}
	if hasGroup {
		if n, err := strconv.ParseUint(gs, 10, 32); err == nil {
			gid = uint32(n)
		} else {
			g, err := user.LookupGroup(gs)
			if err != nil {
				return identity{}, fmt.Errorf("group %q: %w", gs, err)
			}
			n, _ := strconv.ParseUint(g.Gid, 10, 32)
			gid = uint32(n)
		}
	}
	var groups []uint32
	if u != nil && !hasGroup {
		if ids, err := u.GroupIds(); err == nil {
			for _, s := range ids {
				if n, err := strconv.ParseUint(s, 10, 32); err == nil && uint32(n) != gid {
					groups = append(groups, uint32(n))
				}
			}
		}
	}
	id.cred = &syscall.Credential{Uid: uid, Gid: gid, Groups: groups, NoSetGroups: false}
	if groups == nil {
		id.cred.Groups = []uint32{}
	}
	return id, nil
}

func homeOf(uid, def string) string {
	if u, err := user.LookupId(uid); err == nil && u.HomeDir != "" {
		return u.HomeDir
	}
	return def
}
