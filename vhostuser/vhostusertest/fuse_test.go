package vhostusertest

import (
	"bytes"
	"testing"
)

// TestPageLayout checks that Pages lays a request out as Linux's virtio-fs driver does: header
// and arguments in descriptors of their own, file data in page-sized descriptors no two of
// which are adjacent, the reply's header apart from its payload.
func TestPageLayout(t *testing.T) {
	c := &FUSE{f: &Frontend{Mem: make([]byte, 8<<20)}, in: 0, out: 4 << 20, pages: 5 << 20}
	wr := make([]byte, 40)
	data := bytes.Repeat([]byte("0123456789abcdef"), (maxPaged-100)/16)
	bufs, reply, err := c.pageLayout([][]byte{wr, data}, 8, true)
	if err != nil {
		t.Fatal(err)
	}
	npages := (len(data) + pageSize - 1) / pageSize
	if want := 2 + npages + 2; len(bufs) != want {
		t.Fatalf("%d descriptors for a WRITE of %d bytes, want %d", len(bufs), len(data), want)
	}
	if bufs[0] != (Buf{Addr: c.in, Len: inHeaderSize}) || bufs[1].Len != 40 || bufs[1].Addr == c.in+inHeaderSize {
		t.Fatalf("header and argument: %+v %+v", bufs[0], bufs[1])
	}
	var got []byte
	for i, b := range bufs[2 : 2+npages] {
		if b.Write || b.Len > pageSize || b.Addr%pageSize != 0 {
			t.Fatalf("data descriptor %d: %+v", i, b)
		}
		if i > 0 && bufs[2+i-1].Addr+pageSize >= b.Addr {
			t.Fatalf("data descriptors %d and %d are adjacent", i-1, i)
		}
		got = append(got, c.f.Mem[b.Addr:b.Addr+uint64(b.Len)]...)
	}
	if !bytes.Equal(got, data) {
		t.Fatal("the data descriptors do not hold the data")
	}
	if oh := bufs[len(bufs)-2]; oh != (Buf{Addr: c.out, Len: outHeaderSize, Write: true}) {
		t.Fatalf("reply header %+v", oh)
	}
	if len(reply) != 1 || reply[0] != bufs[len(bufs)-1] || reply[0].Addr == c.out+outHeaderSize || !reply[0].Write {
		t.Fatalf("reply payload %+v (descriptors end %+v)", reply, bufs[len(bufs)-1])
	}

	// A READ's reply payload of more than a page is pages too; one of more than maxPaged is
	// refused, as is data of more than maxPaged.
	bufs, reply, err = c.pageLayout([][]byte{wr}, maxPaged, true)
	if err != nil || len(reply) != maxPaged/pageSize || len(bufs) != 3+len(reply) {
		t.Fatalf("READ of 1 MiB: %d descriptors, %d reply pages, %v", len(bufs), len(reply), err)
	}
	if _, _, err := c.pageLayout([][]byte{wr}, maxPaged+1, true); err == nil {
		t.Fatal("a reply of more than maxPaged was laid out")
	}
	if _, _, err := c.pageLayout([][]byte{wr, make([]byte, maxPaged+1)}, 8, true); err == nil {
		t.Fatal("data of more than maxPaged was laid out")
	}
	// FORGET has no reply.
	if bufs, reply, err = c.pageLayout([][]byte{wr}, 0, false); err != nil || len(bufs) != 2 || reply != nil {
		t.Fatalf("FORGET: %+v %+v %v", bufs, reply, err)
	}
}
