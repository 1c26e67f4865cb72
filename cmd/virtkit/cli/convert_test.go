package cli_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/imagetest"
	"github.com/virtkit/virtkit/imaging/store"
)

// runImageCmd runs the built binary with its own state and cache folders.
func runImageCmd(t *testing.T, bin, home string, args ...string) (string, error) {
	t.Helper()
	cmd := exec.Command(bin, args...)
	cmd.Env = append(os.Environ(), "XDG_STATE_HOME="+filepath.Join(home, "state"), "XDG_CACHE_HOME="+filepath.Join(home, "cache"),
		"VIRTKIT_CONFIG=/dev/null")
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	if err != nil {
		return out.String(), &exec.ExitError{ProcessState: cmd.ProcessState, Stderr: errb.Bytes()}
	}
	return out.String(), nil
}

// Two virtkit processes converting the same image at once build it once and print the same bundle;
// images lists it, prune removes it; oci-pull writes the flattened tar.
func TestConvertCLI(t *testing.T) {
	bin := cmdtest.Binary(t, "virtkit")
	agent := cmdtest.Binary(t, "virtkit-agent")
	host := imagetest.Registry(t)
	ref := host + "/cli:1"
	imagetest.Push(t, ref, imagetest.Image(t, v1.Config{Cmd: []string{"/bin/true"}},
		imagetest.Tar(t, imagetest.Dir("bin"), imagetest.Reg("bin/true", strings.Repeat("x", 1<<20)))))
	home := t.TempDir()

	var wg sync.WaitGroup
	outs := make([]string, 2)
	for i := range outs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			out, err := runImageCmd(t, bin, home, "convert", "-q", "--insecure", "--agent", agent, ref)
			if err != nil {
				t.Errorf("convert %d: %v: %s", i, err, err.(*exec.ExitError).Stderr)
			}
			outs[i] = strings.TrimSpace(out)
		}()
	}
	wg.Wait()
	if outs[0] == "" || outs[0] != outs[1] {
		t.Fatalf("bundles %q", outs)
	}
	if _, err := os.Stat(filepath.Join(outs[0], "rootfs.ext4")); err != nil {
		t.Fatal(err)
	}

	out, err := runImageCmd(t, bin, home, "images", "-o", "json")
	if err != nil {
		t.Fatal(err)
	}
	var list []store.Bundle
	if err := json.Unmarshal([]byte(out), &list); err != nil || len(list) != 1 || list[0].Dir != outs[0] || list[0].Image.Source != ref {
		t.Fatalf("images: %v %s", err, out)
	}

	out, err = runImageCmd(t, bin, home, "convert", "-o", "json", "--insecure", "--agent", agent, "--pull", "never", ref)
	if err != nil {
		t.Fatal(err)
	}
	var b store.Bundle
	if err := json.Unmarshal([]byte(out), &b); err != nil || b.Dir != outs[0] || b.FSUUID == "" {
		t.Fatalf("convert -o json: %v %s", err, out)
	}

	tarOut := filepath.Join(t.TempDir(), "rootfs.tar")
	if _, err := runImageCmd(t, bin, home, "oci-pull", "-q", "--insecure", ref, tarOut); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(tarOut)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if m := imagetest.ReadTar(t, f); m["bin/true"].Size != 1<<20 {
		t.Errorf("oci-pull tar: %v", m)
	}
	if _, err := runImageCmd(t, bin, home, "oci-pull", "-q", "oci:/nonexistent", filepath.Join(t.TempDir(), "x.tar")); err == nil {
		t.Error("oci-pull of a missing layout succeeded")
	}

	if _, err := runImageCmd(t, bin, home, "images", "prune", "--keep", "0"); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(outs[0]); !os.IsNotExist(err) {
		t.Errorf("bundle still there after prune: %v", err)
	}
}
