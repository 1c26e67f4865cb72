package initproc

import (
	"net/netip"
	"reflect"
	"strings"
	"testing"
	"time"
)

func TestSplitCmdline(t *testing.T) {
	got := SplitCmdline(`console=ttyS0  virtkit.ssh_key="ssh-ed25519 AAAA me@host" quiet` + "\n")
	want := []string{"console=ttyS0", "virtkit.ssh_key=ssh-ed25519 AAAA me@host", "quiet"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("SplitCmdline = %q, want %q", got, want)
	}
}

func TestLoad(t *testing.T) {
	file := "# comment\nmode=agent\nvirtkit.fs=a:/a\nhostname=fromfile\n"
	cmdline := `root=/dev/vda ro virtkit.hostname=web1 virtkit.overlay=/dev/vdb virtkit.fs=share:/mnt/share:ro,cache:/cache virtkit.fs=x:/x virtkit.net=static:10.77.0.5/24,10.77.0.1 virtkit.dns=10.77.0.1,1.1.1.1 virtkit.ssh_key=b64:c3NoLWVkMjU1MTkgQUFBQSBrZXk= virtkit.linger=2s virtkit.exitcode=/dev/hvc1 virtkit.volume=/dev/vdc:/data,/dev/vdd:/ref:ro virtkit.command=b64:WyJyZWRpcy1zZXJ2ZXIiLCItLWRpciIsIi9kYXRhIGRpciJd virtkit.env=A=1,2 virtkit.env=b64:WyJCPXggeSIsIkM9Il0= virtkit.nic=eth0`
	c, err := Load(file, cmdline, []string{"VIRTKIT_MODE=entrypoint", "VIRTKIT_AGENT=unix:///x", "HOME=/"})
	if err != nil {
		t.Fatal(err)
	}
	want := defaults()
	want.Mode = "entrypoint"
	want.Hostname = "web1"
	want.Overlay = "/dev/vdb"
	want.FS = []Share{{Tag: "share", Path: "/mnt/share", RO: true}, {Tag: "cache", Path: "/cache"}, {Tag: "x", Path: "/x"}}
	want.Net = Net{Mode: "static", Address: netip.MustParsePrefix("10.77.0.5/24"), Gateway: netip.MustParseAddr("10.77.0.1")}
	want.DNS = []netip.Addr{netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("1.1.1.1")}
	want.SSHKeys = []string{"ssh-ed25519 AAAA key"}
	want.Linger = 2 * time.Second
	want.ExitCode = "/dev/hvc1"
	want.Volumes = []Volume{{Dev: "/dev/vdc", Path: "/data"}, {Dev: "/dev/vdd", Path: "/ref", RO: true}}
	want.Command = []string{"redis-server", "--dir", "/data dir"}
	want.Env = []string{"A=1,2", "B=x y", "C="}
	want.NIC = "eth0"
	if !reflect.DeepEqual(c, want) {
		t.Fatalf("Load =\n%+v\nwant\n%+v", c, want)
	}
	for _, bad := range []string{"virtkit.mode=bogus", "virtkit.net=wifi", "virtkit.fs=notag", "virtkit.overlay=vdb", "virtkit.dns=x", "virtkit.linger=soon", "virtkit.net=static:1.2.3.4",
		"virtkit.volume=vdc:/data", "virtkit.volume=/dev/vdc:data", "virtkit.volume=/dev/vdc:/d:rx", "virtkit.command=b64:!!", "virtkit.command=b64:eyJhIjoxfQ==",
		"virtkit.command=,", "virtkit.env=NOEQUALS", "virtkit.env==v", "virtkit.nic=a/b"} {
		if _, err := Load("", bad, nil); err == nil || !strings.Contains(err.Error(), strings.SplitN(strings.TrimPrefix(bad, "virtkit."), "=", 2)[0]) {
			t.Errorf("Load(%q) = %v, want an error naming the key", bad, err)
		}
	}
	if _, err := Load("no equals sign", "", nil); err == nil || !strings.Contains(err.Error(), "line 1") {
		t.Errorf("bad config file line: %v", err)
	}
}

func TestImage(t *testing.T) {
	im, err := ParseImage([]byte(`{"entrypoint":["/e"],"cmd":["a","b"],"env":["X=1"],"workdir":"/w","user":"1:2","ports":["80/tcp"]}`))
	if err != nil || !reflect.DeepEqual(im.Argv(), []string{"/e", "a", "b"}) || im.User != "1:2" || im.WorkingDir != "/w" {
		t.Fatalf("ParseImage: %+v %v", im, err)
	}
	if _, err := ParseImage([]byte(`{"cmd":"notalist"}`)); err == nil {
		t.Fatal("a bad image config parsed")
	}
}

func TestLoadCommaCommand(t *testing.T) {
	c, err := Load("", "virtkit.command=/bin/sh,-c,true", nil)
	if err != nil || !reflect.DeepEqual(c.Command, []string{"/bin/sh", "-c", "true"}) {
		t.Fatalf("virtkit.command comma list: %q %v", c.Command, err)
	}
}

func TestImageWith(t *testing.T) {
	im := Image{Entrypoint: []string{"/e"}, Cmd: []string{"c"}, Env: []string{"PATH=/bin", "A=1"}, User: "u"}
	got := im.With([]string{"/x", "y"}, []string{"A=2", "B=3"})
	want := Image{Entrypoint: []string{"/x", "y"}, Env: []string{"PATH=/bin", "A=2", "B=3"}, User: "u"}
	if !reflect.DeepEqual(got, want) {
		t.Fatalf("With = %+v, want %+v", got, want)
	}
	if !reflect.DeepEqual(im.Env, []string{"PATH=/bin", "A=1"}) {
		t.Fatalf("With changed the receiver's env: %q", im.Env)
	}
	if got := im.With(nil, nil); !reflect.DeepEqual(got, im) {
		t.Fatalf("With(nil, nil) = %+v", got)
	}
}

func FuzzLoad(f *testing.F) {
	f.Add("mode=agent\nfs=a:/b:ro", `virtkit.net=static:10.0.0.2/24,10.0.0.1 virtkit.ssh_key="a b" virtkit.fs=x:/y`)
	f.Add("", `virtkit.ssh_key=b64:!!! "unterminated`)
	f.Add("volume=/dev/vdc:/data", `virtkit.command=b64:WyJhIl0= virtkit.env=A=1 virtkit.env=b64:WyJCPTIiXQ==`)
	f.Fuzz(func(t *testing.T, file, cmdline string) {
		c, err := Load(file, cmdline, nil)
		if err != nil {
			return
		}
		for _, s := range c.FS {
			if s.Tag == "" || !strings.HasPrefix(s.Path, "/") {
				t.Fatalf("accepted bad share %+v", s)
			}
		}
		for _, v := range c.Volumes {
			if !strings.HasPrefix(v.Dev, "/dev/") || !strings.HasPrefix(v.Path, "/") {
				t.Fatalf("accepted bad volume %+v", v)
			}
		}
		for _, kv := range c.Env {
			if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
				t.Fatalf("accepted bad env %q", kv)
			}
		}
		if c.Command != nil && (len(c.Command) == 0 || c.Command[0] == "") {
			t.Fatalf("accepted empty command %q", c.Command)
		}
		if c.Net.Mode == "static" && !c.Net.Address.IsValid() {
			t.Fatalf("static net without address")
		}
	})
}

func FuzzParseImage(f *testing.F) {
	f.Add([]byte(`{"entrypoint":["/e"],"cmd":["a"],"env":["X=1"],"workdir":"/w","user":"u"}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		im, err := ParseImage(b)
		if err == nil {
			_ = im.Argv()
		}
	})
}
