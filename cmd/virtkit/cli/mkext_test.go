package cli_test

import (
	"archive/tar"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

func TestMkextCommands(t *testing.T) {
	vk := cmdtest.Binary(t, "virtkit")
	dir := t.TempDir()
	var tb bytes.Buffer
	tw := tar.NewWriter(&tb)
	tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "etc/motd", Mode: 0o644, Size: 3})
	tw.Write([]byte("hi\n"))
	tw.Close()
	in := filepath.Join(dir, "in.tar")
	if err := os.WriteFile(in, tb.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
	agent := filepath.Join(dir, "agent")
	os.WriteFile(agent, []byte("#!/bin/sh\n"), 0o755)
	run := func(stdin []byte, args ...string) (string, error) {
		cmd := exec.Command(vk, args...)
		cmd.Env = append(os.Environ(), "XDG_STATE_HOME="+dir, "XDG_CONFIG_HOME="+dir)
		cmd.Stdin = bytes.NewReader(stdin)
		var out, errb bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &errb
		err := cmd.Run()
		if err != nil {
			return errb.String(), err
		}
		return out.String(), nil
	}
	img := filepath.Join(dir, "out.ext4")
	out, err := run(tb.Bytes(), "-o", "json", "mkext-tar", "--size", "64M", "--label", "root",
		"--inject", agent+":/sbin/virtkit-agent:0755", "-", img)
	if err != nil {
		t.Fatalf("mkext-tar: %v: %s", err, out)
	}
	var res struct {
		UUID string
		Size int64
	}
	if err := json.Unmarshal([]byte(out), &res); err != nil || res.Size != 64<<20 {
		t.Fatalf("output %q: %v", out, err)
	}
	ext4test.Fsck(t, img)
	if got := ext4test.Cat(t, img, "/sbin/virtkit-agent"); string(got) != "#!/bin/sh\n" {
		t.Fatalf("injected agent: %q", got)
	}
	fp, err := run(nil, "fingerprint", "--size", "64M", "--label", "root", "--inject", agent+":/sbin/virtkit-agent:0755", in)
	if err != nil || strings.TrimSpace(fp) != res.UUID {
		t.Fatalf("fingerprint = %q (%v), image %s", fp, err, res.UUID)
	}
	pu, err := run(nil, "mkext-tar", "--print-uuid", "--size", "64M", "--label", "root", "--inject", agent+":/sbin/virtkit-agent:0755", in)
	if err != nil || strings.TrimSpace(pu) != res.UUID {
		t.Fatalf("--print-uuid = %q (%v), image %s", pu, err, res.UUID)
	}
	tree := filepath.Join(dir, "tree")
	os.MkdirAll(filepath.Join(tree, "a"), 0o755)
	os.WriteFile(filepath.Join(tree, "a", "f"), []byte("x"), 0o600)
	img2 := filepath.Join(dir, "dir.ext4")
	out, err = run(nil, "mkext", "--no-journal", tree, img2)
	if err != nil || !strings.Contains(out, "uuid=") {
		t.Fatalf("mkext: %v: %s", err, out)
	}
	if fp, err := run(nil, "fingerprint", "--no-journal", tree); err != nil || !strings.Contains(out, "uuid="+strings.TrimSpace(fp)) {
		t.Fatalf("fingerprint DIR = %q (%v); mkext said %q", fp, err, out)
	}
	ext4test.Fsck(t, img2)
	bad := filepath.Join(dir, "bad.ext4")
	if out, err := run(tb.Bytes()[:700], "mkext-tar", "-", bad); err == nil || !strings.Contains(out, "mkext:") {
		t.Fatalf("truncated input: err %v, stderr %q", err, out)
	}
	if _, err := os.Stat(bad); err == nil {
		t.Fatal("failed conversion left an output file")
	}
}
