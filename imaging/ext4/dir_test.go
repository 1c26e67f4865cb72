package ext4_test

import (
	"archive/tar"
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/virtkit/virtkit/cmd/cmdtest"
	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

func TestWriteDirEntryTypes(t *testing.T) {
	src := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.MkdirAll(filepath.Join(src, "a/b/c"), 0o750))
	must(os.WriteFile(filepath.Join(src, "a/file"), randBytes(5, 70000), 0o640))
	must(os.Link(filepath.Join(src, "a/file"), filepath.Join(src, "a/b/hard")))
	must(os.Symlink("../file", filepath.Join(src, "a/b/rel")))
	must(os.Symlink(strings.Repeat("long/", 100), filepath.Join(src, "a/long")))
	must(unix.Mkfifo(filepath.Join(src, "fifo"), 0o600))
	l, err := net.Listen("unix", filepath.Join(src, "sock"))
	must(err)
	defer l.Close()
	must(unix.Setxattr(filepath.Join(src, "a/file"), "user.note", []byte("hello"), 0))
	must(unix.Setxattr(filepath.Join(src, "a"), "user.big", []byte(strings.Repeat("z", 2000)), 0))
	must(os.Chmod(filepath.Join(src, "a/b"), 0o2775|os.ModeSetgid))
	must(os.WriteFile(filepath.Join(src, "zeros"), make([]byte, 1<<20), 0o644))
	if os.Geteuid() == 0 {
		must(unix.Mknod(filepath.Join(src, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))))
		must(unix.Mknod(filepath.Join(src, "blk"), unix.S_IFBLK|0o660, int(unix.Mkdev(300, 5000))))
		must(os.Lchown(filepath.Join(src, "a/b/rel"), 1234, 5678))
		must(os.Chown(filepath.Join(src, "a/file"), 100000, 100001))
	}
	mt := time.Date(2021, 1, 2, 3, 4, 5, 987654321, time.UTC)
	must(os.Chtimes(filepath.Join(src, "a/file"), mt, mt))
	img := filepath.Join(t.TempDir(), "dir.ext4")
	if _, err := ext4.WriteDir(context.Background(), src, img, ext4.Options{}); err != nil {
		t.Fatal(err)
	}
	ext4test.Fsck(t, img)
	ext4test.CompareTree(t, img, src)
	if in := ext4test.Stat(t, img, "/zeros")[0]; in.Blockcount != 0 {
		t.Errorf("all-zero file allocates %d sectors, want a hole", in.Blockcount)
	}
	if got := ext4test.Xattr(t, img, "/a/file", "user.note"); string(got) != "hello" {
		t.Errorf("user.note = %q", got)
	}
	if got := ext4test.Xattr(t, img, "/a", "user.big"); len(got) != 2000 {
		t.Errorf("user.big is %d bytes", len(got))
	}
}

// TestLargeSparseFile writes a file over 4 GiB (huge_file, 64-bit sizes) that is mostly holes,
// with data straddling the 4 GiB mark, and reads the data back through the image's extents.
func TestLargeSparseFile(t *testing.T) {
	cmdtest.Heavy(t)
	const size = 5<<30 + 12345
	marks := map[int64][]byte{
		0:                        []byte("start"),
		1<<32 - 3:                []byte("across-4GiB"),
		3 << 30:                  randBytes(7, 3<<20),
		size - int64(len("end")): []byte("end"),
	}
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "big", Size: size, Mode: 0o644, ModTime: t0})
		buf := make([]byte, 1<<20)
		for off := int64(0); off < size; {
			n := min(int64(len(buf)), size-off)
			clear(buf)
			for at, m := range marks {
				for i := range m {
					if p := at + int64(i); p >= off && p < off+n {
						buf[p-off] = m[i]
					}
				}
			}
			if _, err := tw.Write(buf[:n]); err != nil {
				pw.CloseWithError(err)
				return
			}
			off += n
		}
		pw.CloseWithError(tw.Close())
	}()
	img := filepath.Join(t.TempDir(), "big.ext4")
	if _, err := ext4.WriteTar(context.Background(), pr, img, ext4.Options{}); err != nil {
		t.Fatal(err)
	}
	ext4test.Fsck(t, img)
	in := ext4test.Stat(t, img, "/big")[0]
	if in.Size != size {
		t.Fatalf("size %d, want %d", in.Size, size)
	}
	if in.Blockcount > 2*(3<<20)/512 {
		t.Errorf("blockcount %d: holes were filled", in.Blockcount)
	}
	ext := ext4test.Extents(t, img, "/big")
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for at, m := range marks {
		got := make([]byte, len(m))
		for i := range m {
			phys, ok := ext.Phys(uint64(at+int64(i)) / 4096)
			if !ok {
				t.Fatalf("offset %d not mapped", at+int64(i))
			}
			var b [1]byte
			if _, err := f.ReadAt(b[:], int64(phys)*4096+(at+int64(i))%4096); err != nil {
				t.Fatal(err)
			}
			got[i] = b[0]
		}
		if string(got) != string(m) {
			t.Errorf("data at %d differs", at)
		}
	}
}

// TestGNUSparseTar converts an archive made by GNU tar --sparse: holes stay holes.
func TestGNUSparseTar(t *testing.T) {
	tarTool := cmdtest.Tool(t, "tar")
	src := t.TempDir()
	f, err := os.Create(filepath.Join(src, "sparse"))
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("middle"), 700<<20)
	f.Truncate(1 << 30)
	f.Close()
	for _, format := range []string{"gnu", "posix"} {
		t.Run(format, func(t *testing.T) {
			tb := filepath.Join(t.TempDir(), "s.tar")
			if out, err := exec.Command(tarTool, "--sparse", "--format="+format, "-C", src, "-cf", tb, "sparse").CombinedOutput(); err != nil {
				t.Fatalf("tar: %v\n%s", err, out)
			}
			if st, _ := os.Stat(tb); st.Size() > 1<<20 {
				t.Fatalf("tar did not store the file sparsely (%d bytes)", st.Size())
			}
			in, err := os.Open(tb)
			if err != nil {
				t.Fatal(err)
			}
			defer in.Close()
			img := filepath.Join(t.TempDir(), "s.ext4")
			if _, err := ext4.WriteTar(context.Background(), in, img, ext4.Options{}); err != nil {
				t.Fatal(err)
			}
			ext4test.Fsck(t, img)
			st := ext4test.Stat(t, img, "/sparse")[0]
			if st.Size != 1<<30 || st.Blockcount != 16 {
				t.Fatalf("size %d blockcount %d; want 1 GiB in two blocks", st.Size, st.Blockcount)
			}
			ext := ext4test.Extents(t, img, "/sparse")
			if p, ok := ext.Phys(700 << 20 / 4096); !ok || p == 0 {
				t.Fatalf("block at 700 MiB not mapped: %v", ext)
			}
		})
	}
}
