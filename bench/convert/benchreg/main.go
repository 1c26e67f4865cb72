// Command benchreg serves an in-process OCI registry (go-containerregistry's) on a local address
// and pushes a Debian image into it built from a root filesystem tar, for bench/convert/run.sh to
// convert with virtkit and with the skopeo + umoci + mke2fs pipeline side by side. It prints the
// image reference once the image is pushed and serves until killed.
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

func main() {
	addr := flag.String("addr", "127.0.0.1:0", "listen address")
	rootfs := flag.String("rootfs", "", "root filesystem tar for the image's layer")
	flag.Parse()
	if *rootfs == "" {
		log.Fatal("benchreg: -rootfs is required")
	}
	ln, err := net.Listen("tcp", *addr)
	if err != nil {
		log.Fatal(err)
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)), registry.WithReferrersSupport(false))}
	go srv.Serve(ln)

	layer, err := tarball.LayerFromFile(*rootfs, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		log.Fatal(err)
	}
	img, err := mutate.Append(mutate.ConfigMediaType(mutate.MediaType(empty.Image, types.OCIManifestSchema1), types.OCIConfigJSON), mutate.Addendum{Layer: layer, MediaType: types.OCILayer})
	if err != nil {
		log.Fatal(err)
	}
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", "amd64"
	cf.Config = v1.Config{Cmd: []string{"/bin/bash"}}
	if img, err = mutate.ConfigFile(img, cf); err != nil {
		log.Fatal(err)
	}
	ref, err := name.ParseReference(ln.Addr().String()+"/bench/debian:bookworm", name.Insecure)
	if err != nil {
		log.Fatal(err)
	}
	if err := remote.Write(ref, img); err != nil {
		log.Fatal(err)
	}
	fmt.Println(ref.String())
	select {}
}
