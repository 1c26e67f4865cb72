package ext4_test

import (
	"archive/tar"
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"testing/iotest"
	"time"

	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"

	"github.com/virtkit/virtkit/imaging/ext4"
	"github.com/virtkit/virtkit/imaging/ext4/ext4test"
)

func fileSum(t testing.TB, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

func smallTree(t testing.TB) []byte {
	return mkTar(t, []entry{
		{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "etc/", Mode: 0o755, ModTime: t0}},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "etc/hostname", Mode: 0o644, ModTime: t0}, data: []byte("vm\n")},
		{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "data", Mode: 0o644, ModTime: t0}, data: randBytes(9, 1<<20)},
		{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "hosts", Linkname: "etc/hostname", ModTime: t0}},
	})
}

func TestDeterministicAndContentAddressed(t *testing.T) {
	tb := smallTree(t)
	imgA, resA := writeTar(t, tb, ext4.Options{})
	imgB, resB := writeTar(t, tb, ext4.Options{})
	if resA != resB || fileSum(t, imgA) != fileSum(t, imgB) {
		t.Fatalf("same input, different images: %+v %+v", resA, resB)
	}
	// A pipe or stdin returns short reads: the content hash (parallel leaves) must not depend on
	// them.
	imgC := filepath.Join(t.TempDir(), "short-reads.ext4")
	resC, err := ext4.WriteTar(context.Background(), iotest.HalfReader(bytes.NewReader(tb)), imgC, ext4.Options{})
	if err != nil || resC != resA || fileSum(t, imgC) != fileSum(t, imgA) {
		t.Fatalf("same input read in short pieces, different image: %+v %+v, %v", resA, resC, err)
	}
	fp, err := ext4.Fingerprint(context.Background(), bytes.NewReader(tb), ext4.Options{})
	if err != nil || fp != resA.UUID {
		t.Fatalf("Fingerprint = %q, %v; image UUID %q", fp, err, resA.UUID)
	}
	if d := ext4test.Dumpe2fs(t, imgA); !strings.Contains(d, resA.UUID) {
		t.Fatalf("dumpe2fs does not show UUID %s", resA.UUID)
	}
	// Options and input both change the identity.
	_, resLabel := writeTar(t, tb, ext4.Options{Label: "x"})
	_, resNJ := writeTar(t, tb, ext4.Options{NoJournal: true})
	other := append([]byte(nil), tb...)
	other = append(other, 0) // trailing byte after the end marker is still input
	_, resOther := writeTar(t, other, ext4.Options{})
	seen := map[string]bool{resA.UUID: true}
	for _, r := range []ext4.Result{resLabel, resNJ, resOther} {
		if seen[r.UUID] {
			t.Fatalf("UUID %s repeated for a different input or options", r.UUID)
		}
		seen[r.UUID] = true
	}
	const fixed = "0b2b6d2e-5b0c-4a39-9a57-0d6c2e9d5a10"
	img, res := writeTar(t, tb, ext4.Options{UUID: fixed})
	if res.UUID != fixed || !strings.Contains(ext4test.Dumpe2fs(t, img), fixed) {
		t.Fatalf("--uuid not applied: %s", res.UUID)
	}
	if fp, _ := ext4.Fingerprint(context.Background(), bytes.NewReader(tb), ext4.Options{UUID: fixed}); fp != fixed {
		t.Fatalf("Fingerprint with UUID override = %s", fp)
	}
}

func TestCompressedInput(t *testing.T) {
	tb := smallTree(t)
	var gz, zs bytes.Buffer
	g := gzip.NewWriter(&gz)
	g.Write(tb)
	g.Close()
	z, _ := zstd.NewWriter(&zs)
	z.Write(tb)
	z.Close()
	for name, in := range map[string][]byte{"plain": tb, "gzip": gz.Bytes(), "zstd": zs.Bytes()} {
		t.Run(name, func(t *testing.T) {
			img, _ := writeTar(t, in, ext4.Options{})
			if got := ext4test.Cat(t, img, "/etc/hostname"); string(got) != "vm\n" {
				t.Fatalf("content %q", got)
			}
			if got := ext4test.Cat(t, img, "/data"); !bytes.Equal(got, randBytes(9, 1<<20)) {
				t.Fatalf("/data differs")
			}
		})
	}
}

func TestSizeJournalLabelInject(t *testing.T) {
	dir := t.TempDir()
	agent := filepath.Join(dir, "agent")
	if err := os.WriteFile(agent, randBytes(4, 100000), 0o600); err != nil {
		t.Fatal(err)
	}
	opts := ext4.Options{Size: 1 << 30, Label: "data", Sync: true, Inject: []ext4.Inject{
		{Src: agent, Dst: "/sbin/virtkit-agent", Mode: 0o755},
		{Src: agent, Dst: "etc/hostname", Mode: 0o600}, // replaces the archive's file
		{Dst: "/.virtkit/image.json", Mode: 0o644, Data: []byte(`{"cmd":["/bin/sh"]}`)},
	}}
	img, res := writeTar(t, smallTree(t), opts)
	st, _ := os.Stat(img)
	if res.Size != 1<<30 || st.Size() != 1<<30 {
		t.Fatalf("size %d, file %d", res.Size, st.Size())
	}
	d := ext4test.Dumpe2fs(t, img)
	for _, want := range []string{"Filesystem volume name:   data", "has_journal", "metadata_csum", "64bit", "huge_file", "dir_index", "extent"} {
		if !strings.Contains(d, want) {
			t.Errorf("dumpe2fs lacks %q", want)
		}
	}
	if got := ext4test.Cat(t, img, "/sbin/virtkit-agent"); !bytes.Equal(got, randBytes(4, 100000)) {
		t.Errorf("injected agent differs")
	}
	if got := ext4test.Cat(t, img, "/.virtkit/image.json"); string(got) != `{"cmd":["/bin/sh"]}` {
		t.Errorf("injected data: %q", got)
	}
	if fp, err := ext4.Fingerprint(context.Background(), bytes.NewReader(smallTree(t)), opts); err != nil || fp != res.UUID {
		t.Errorf("Fingerprint with injects = %s, %v; image %s", fp, err, res.UUID)
	}
	in := ext4test.Stat(t, img, "/sbin/virtkit-agent", "/etc/hostname")
	if in[0].Mode != 0o755 || in[0].UID != 0 || in[1].Mode != 0o600 || in[1].Size != 100000 {
		t.Errorf("injected: %+v %+v", in[0], in[1])
	}
	var blocks int64
	fmt.Sscan(strings.TrimSpace(strings.TrimPrefix(grepLine(d, "Block count:"), "Block count:")), &blocks)
	if blocks != 1<<30/4096 {
		t.Errorf("block count %d", blocks)
	}
	img2, _ := writeTar(t, smallTree(t), ext4.Options{NoJournal: true})
	if strings.Contains(ext4test.Dumpe2fs(t, img2), "has_journal") {
		t.Errorf("--no-journal image has a journal")
	}
}

func grepLine(s, prefix string) string {
	for _, l := range strings.Split(s, "\n") {
		if strings.HasPrefix(l, prefix) {
			return l
		}
	}
	return ""
}

func TestWriteEmpty(t *testing.T) {
	for _, size := range []int64{0, 16 << 20, 200 << 20, 10 << 30, 1 << 40} {
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "empty.ext4")
			res, err := ext4.WriteEmpty(context.Background(), img, ext4.Options{Size: size})
			if err != nil {
				t.Fatal(err)
			}
			ext4test.Fsck(t, img)
			if size != 0 && res.Size != size {
				t.Fatalf("size %d, want %d", res.Size, size)
			}
			st := ext4test.Stat(t, img, "/", "/lost+found")
			if st[0] == nil || st[1] == nil || st[0].Links != 3 {
				t.Fatalf("root/lost+found: %+v %+v", st[0], st[1])
			}
			var st2 syscall.Stat_t
			if err := syscall.Stat(img, &st2); err != nil {
				t.Fatal(err)
			}
			// Empty groups write nothing (their block bitmaps are holes, their inode bitmaps
			// unused); what is left is the superblock and descriptor copies.
			used := st2.Blocks * 512
			t.Logf("%d-byte image allocates %d bytes on the host", size, used)
			if used > 8<<20+size/(64<<10) {
				t.Fatalf("empty image allocates %d bytes on the host: not sparse", used)
			}
		})
	}
}

func TestTooSmall(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "small.ext4")
	_, err := ext4.WriteTar(context.Background(), bytes.NewReader(smallTree(t)), img, ext4.Options{Size: 1 << 20})
	if !errors.Is(err, ext4.ErrNoSpace) {
		t.Fatalf("err = %v, want ErrNoSpace", err)
	}
	assertNoOutput(t, dir)
}

func assertNoOutput(t testing.TB, dir string) {
	t.Helper()
	ents, _ := os.ReadDir(dir)
	for _, e := range ents {
		t.Errorf("left behind: %s", e.Name())
	}
}

// rawTar returns a tar with one regular file whose header fields can be corrupted.
func rawTar(t testing.TB) []byte {
	return mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "file", Mode: 0o644, ModTime: t0, Format: tar.FormatUSTAR}, data: []byte("hello")}})
}

func setChecksum(h []byte) {
	copy(h[148:156], "        ")
	var s int
	for _, c := range h[:512] {
		s += int(c)
	}
	copy(h[148:156], fmt.Sprintf("%06o\x00 ", s))
}

func TestBadInput(t *testing.T) {
	good := rawTar(t)
	badSum := append([]byte(nil), good...)
	badSum[0] ^= 1
	hugeSize := append([]byte(nil), good...)
	copy(hugeSize[124:136], "77777777777\x00")
	setChecksum(hugeSize)
	absurd := append([]byte(nil), good...)
	absurd[124] = 0x80 // base-256: 2^62 bytes
	copy(absurd[125:136], []byte{0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0})
	setChecksum(absurd)
	negative := append([]byte(nil), good...)
	copy(negative[124:136], []byte{0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe})
	setChecksum(negative)
	nulName := append([]byte(nil), good...)
	copy(nulName[0:8], "a\x00b\x00c/..")
	setChecksum(nulName)
	var xz bytes.Buffer
	xz.Write([]byte{0xfd, '7', 'z', 'X', 'Z', 0, 0, 0})
	cases := map[string][]byte{
		"truncated header":    good[:300],
		"truncated data":      good[:515],
		"truncated padding":   good[:600],
		"bad checksum":        badSum,
		"size beyond input":   hugeSize,
		"absurd size":         absurd,
		"negative size":       negative,
		"xz":                  xz.Bytes(),
		"gzip garbage":        {0x1f, 0x8b, 8, 0, 1, 2, 3},
		"zstd garbage":        {0x28, 0xb5, 0x2f, 0xfd, 9, 9, 9, 9},
		"link to missing":     mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeLink, Name: "a", Linkname: "../../etc/shadow"}}}),
		"link to directory":   mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeDir, Name: "d/"}}, {hdr: tar.Header{Typeflag: tar.TypeLink, Name: "a", Linkname: "d"}}}),
		"empty symlink":       mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: "a", Linkname: ""}}}),
		"long name component": mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: strings.Repeat("n", 256), Format: tar.FormatPAX}}}),
		"huge device":         mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "c", Devmajor: 1 << 20, Format: tar.FormatPAX}}}),
		"bad acl":             mkTar(t, []entry{{hdr: tar.Header{Typeflag: tar.TypeReg, Name: "f", PAXRecords: map[string]string{"SCHILY.xattr.system.posix_acl_access": "junk"}}}}),
	}
	for name, in := range cases {
		t.Run(name, func(t *testing.T) {
			dir := t.TempDir()
			_, err := ext4.WriteTar(context.Background(), bytes.NewReader(in), filepath.Join(dir, "out.ext4"), ext4.Options{})
			if err == nil {
				t.Fatal("no error")
			}
			if !strings.HasPrefix(err.Error(), "mkext: ") {
				t.Errorf("error %q does not say the operation", err)
			}
			t.Log(err)
			assertNoOutput(t, dir)
		})
	}
}

func TestCancel(t *testing.T) {
	dir := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	pr, pw := io.Pipe()
	go func() {
		tw := tar.NewWriter(pw)
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: "big", Size: 1 << 40, Mode: 0o644})
		buf := bytes.Repeat([]byte{1}, 1<<20)
		for i := 0; ; i++ {
			if i == 8 {
				cancel()
			}
			if _, err := tw.Write(buf); err != nil {
				return
			}
		}
	}()
	_, err := ext4.WriteTar(ctx, pr, filepath.Join(dir, "out.ext4"), ext4.Options{})
	pr.CloseWithError(errors.New("done"))
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	assertNoOutput(t, dir)
}

// Writer takes parsed entries; a bad one is a clear error, and Abort leaves nothing.
func TestWriterEntries(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "w.ext4")
	const uuid = "0b2b6d2e-5b0c-4a39-9a57-0d6c2e9d5a10"
	w, err := ext4.Create(context.Background(), img, ext4.Options{UUID: uuid})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Add(&tar.Header{Name: "etc/hostname", Typeflag: tar.TypeReg, Mode: 0o644, Size: 3, ModTime: t0}, strings.NewReader("vm\n")); err != nil {
		t.Fatal(err)
	}
	if err := w.Add(&tar.Header{Name: "short", Typeflag: tar.TypeReg, Mode: 0o644, Size: 10, ModTime: t0}, strings.NewReader("abc")); err == nil || !strings.Contains(err.Error(), "short") {
		t.Errorf("truncated data: %v", err)
	}
	w.Abort()
	assertNoOutput(t, dir)

	w, err = ext4.Create(context.Background(), img, ext4.Options{UUID: uuid})
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Add(&tar.Header{Name: "etc/hostname", Typeflag: tar.TypeReg, Mode: 0o644, Size: 3, ModTime: t0}, strings.NewReader("vm\n")); err != nil {
		t.Fatal(err)
	}
	res, err := w.Close()
	if err != nil || res.UUID != uuid {
		t.Fatalf("Close: %+v, %v", res, err)
	}
	w.Abort() // after Close: nothing
	ext4test.Fsck(t, img)
	if st := ext4test.Stat(t, img, "/etc/hostname"); st[0] == nil || st[0].Size != 3 {
		t.Fatalf("entry not in the image: %+v", st[0])
	}
}

// A folder walk stopped early (cancelled here) ends its walking goroutines and leaves nothing.
func TestCancelDir(t *testing.T) {
	tree := t.TempDir()
	for i := 0; i < 2000; i++ {
		if err := os.WriteFile(filepath.Join(tree, fmt.Sprintf("f%04d", i)), []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	before := runtime.NumGoroutine()
	out := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := ext4.WriteDir(ctx, tree, filepath.Join(out, "out.ext4"), ext4.Options{}); !errors.Is(err, context.Canceled) {
		t.Fatalf("err = %v", err)
	}
	assertNoOutput(t, out)
	for i := 0; runtime.NumGoroutine() > before; i++ { // leaf hashes end by themselves
		if i == 100 {
			t.Fatalf("%d goroutines after WriteDir returned, %d before", runtime.NumGoroutine(), before)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
