package jobstest

import (
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats-server/v2/server"
)

// Cluster is an n-node NATS cluster with JetStream on loopback, in this process: the shape of
// deploy/nats-cluster/ for tests. Kill stops one node at once (its clients fail over).
type Cluster struct {
	t     testing.TB
	nodes []*server.Server
	urls  []string
}

func freePort(t testing.TB) int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

// NewCluster starts n nodes and waits until JetStream has a meta leader.
func NewCluster(t testing.TB, n int) *Cluster {
	t.Helper()
	dir := t.TempDir()
	cports := make([]int, n)
	var routes []string
	for i := range cports {
		cports[i] = freePort(t)
		routes = append(routes, fmt.Sprintf("nats-route://127.0.0.1:%d", cports[i]))
	}
	c := &Cluster{t: t}
	for i := range n {
		opts := &server.Options{
			ServerName: fmt.Sprintf("n%d", i+1),
			Host:       "127.0.0.1",
			Port:       freePort(t),
			JetStream:  true,
			StoreDir:   filepath.Join(dir, fmt.Sprintf("n%d", i+1)),
			NoSigs:     true,
			Cluster: server.ClusterOpts{
				Name: "vk-test",
				Host: "127.0.0.1",
				Port: cports[i],
			},
			Routes:                 server.RoutesFromStr(strings.Join(routes, ",")),
			DisableJetStreamBanner: true,
		}
		s, err := server.NewServer(opts)
		if err != nil {
			t.Fatalf("jobstest: nats node %d: %v", i+1, err)
		}
		go s.Start()
		if !s.ReadyForConnections(20 * time.Second) {
			t.Fatalf("jobstest: nats node %d not ready", i+1)
		}
		c.nodes = append(c.nodes, s)
		c.urls = append(c.urls, s.ClientURL())
	}
	t.Cleanup(func() {
		for _, s := range c.nodes {
			s.Shutdown()
			s.WaitForShutdown()
		}
	})
	deadline := time.Now().Add(60 * time.Second)
	for {
		ready := 0
		for _, s := range c.nodes {
			if s.JetStreamIsClustered() && s.JetStreamIsCurrent() {
				ready++
			}
		}
		if ready == n && c.leader() {
			return c
		}
		if time.Now().After(deadline) {
			t.Fatalf("jobstest: nats cluster has no JetStream meta leader after 60s")
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (c *Cluster) leader() bool {
	for _, s := range c.nodes {
		if s.JetStreamIsLeader() {
			return true
		}
	}
	return false
}

// URL is every node's client URL, comma-separated (what nats.url takes).
func (c *Cluster) URL() string { return strings.Join(c.urls, ",") }

// Kill stops node i (0-based) at once.
func (c *Cluster) Kill(i int) {
	c.nodes[i].Shutdown()
	c.nodes[i].WaitForShutdown()
}
