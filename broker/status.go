package broker

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Report is what `virtkit status` shows.
type Report struct {
	Broker  BrokerStatus   `json:"broker"`
	Streams []StreamStatus `json:"streams"`
	Buckets []StreamStatus `json:"buckets"`
	Hosts   []*Host        `json:"hosts"`
	// Projectors are the hosts' projectors with how far behind the log they are.
	Projectors []ProjectorStatus `json:"projectors"`
	Problems   []string          `json:"problems,omitempty"`
}

// ProjectorStatus is one host's projector: the last event sequence it applied and how many
// events of the log it has not.
type ProjectorStatus struct {
	Host    string `json:"host"`
	Applied uint64 `json:"applied"`
	Lag     uint64 `json:"lag"`
}

// BrokerStatus describes the server the client is connected to.
type BrokerStatus struct {
	URL       string    `json:"url"`
	Server    string    `json:"server"`
	Version   string    `json:"version"`
	Cluster   string    `json:"cluster,omitempty"`
	RTT       Duration  `json:"rtt"`
	Embedded  bool      `json:"embedded"`
	PID       int       `json:"pid,omitempty"`
	Started   time.Time `json:"started,omitzero"`
	Memory    uint64    `json:"js_memory_bytes"`
	Storage   uint64    `json:"js_storage_bytes"`
	Consumers int       `json:"js_consumers"`
}

// StreamStatus is one stream or KV bucket.
type StreamStatus struct {
	Name      string    `json:"name"`
	Messages  uint64    `json:"messages"`
	Bytes     uint64    `json:"bytes"`
	Consumers int       `json:"consumers"`
	FirstSeq  uint64    `json:"first_seq"`
	LastSeq   uint64    `json:"last_seq"`
	LastTime  time.Time `json:"last_time,omitzero"`
	Replicas  int       `json:"replicas"`
}

// Status gathers a Report. ep, if not nil, is the local daemon's endpoint. Missing streams are
// reported as problems, not errors, so status works against a half-provisioned broker.
func Status(ctx context.Context, c *Client, ep *Endpoint) (*Report, error) {
	r := &Report{}
	rtt, err := c.nc.RTT()
	if err != nil {
		return nil, fmt.Errorf("broker: status: %w", err)
	}
	r.Broker = BrokerStatus{
		URL: c.nc.ConnectedUrlRedacted(), Server: c.nc.ConnectedServerName(), Version: c.nc.ConnectedServerVersion(),
		Cluster: c.nc.ConnectedClusterName(), RTT: Duration(rtt),
	}
	if ep != nil {
		r.Broker.Embedded, r.Broker.PID, r.Broker.Started = ep.Embedded, ep.PID, ep.Started
	}
	ai, err := c.js.AccountInfo(ctx)
	if err != nil {
		return nil, fmt.Errorf("broker: status: JetStream: %w", err)
	}
	r.Broker.Memory, r.Broker.Storage, r.Broker.Consumers = ai.Memory, ai.Store, ai.Consumers
	streamStatus := func(name string) (StreamStatus, bool) {
		st, err := c.js.Stream(ctx, name)
		if err != nil {
			r.Problems = append(r.Problems, fmt.Sprintf("%s: %v", name, err))
			return StreamStatus{Name: name}, false
		}
		i := st.CachedInfo()
		return StreamStatus{Name: name, Messages: i.State.Msgs, Bytes: i.State.Bytes, Consumers: i.State.Consumers,
			FirstSeq: i.State.FirstSeq, LastSeq: i.State.LastSeq, LastTime: i.State.LastTime, Replicas: i.Config.Replicas}, true
	}
	for _, name := range []string{EventsStream, WorkStream, ExecStream} {
		s, _ := streamStatus(name)
		r.Streams = append(r.Streams, s)
	}
	for _, b := range []string{BucketVMs, BucketImages, BucketJobs, BucketHosts} {
		s, _ := streamStatus("KV_" + b)
		s.Name = b
		r.Buckets = append(r.Buckets, s)
	}
	hosts, err := readHosts(ctx, c)
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
	}
	r.Hosts = hosts
	if len(r.Streams) > 0 {
		ps, err := readProjectors(ctx, c, r.Streams[0].LastSeq)
		if err != nil {
			r.Problems = append(r.Problems, err.Error())
		}
		r.Projectors = ps
	}
	return r, nil
}

func readProjectors(ctx context.Context, c *Client, last uint64) ([]ProjectorStatus, error) {
	kv, err := c.js.KeyValue(ctx, BucketCheckpoints)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", BucketCheckpoints, err)
	}
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", BucketCheckpoints, err)
	}
	defer w.Stop()
	var out []ProjectorStatus
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return out, errors.New("vk_checkpoints: watcher closed")
			}
			if e == nil {
				sort.Slice(out, func(i, j int) bool { return out[i].Host < out[j].Host })
				return out, nil
			}
			host, ok := strings.CutPrefix(e.Key(), "projector-")
			if !ok {
				continue
			}
			n, err := strconv.ParseUint(string(e.Value()), 10, 64)
			if err != nil {
				return out, fmt.Errorf("vk_checkpoints/%s: %w", e.Key(), err)
			}
			ps := ProjectorStatus{Host: host, Applied: n}
			if last > n {
				ps.Lag = last - n
			}
			out = append(out, ps)
		case <-ctx.Done():
			return out, ctx.Err()
		}
	}
}

func readHosts(ctx context.Context, c *Client) ([]*Host, error) {
	kv, err := c.js.KeyValue(ctx, BucketHosts)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", BucketHosts, err)
	}
	w, err := kv.WatchAll(ctx, jetstream.IgnoreDeletes())
	if err != nil {
		return nil, fmt.Errorf("%s: %w", BucketHosts, err)
	}
	defer w.Stop()
	s := NewState()
	for {
		select {
		case e, ok := <-w.Updates():
			if !ok {
				return nil, errors.New("vk_hosts: watcher closed")
			}
			if e == nil {
				out := make([]*Host, 0, len(s.Hosts))
				for _, h := range s.Hosts {
					out = append(out, h)
				}
				sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
				return out, nil
			}
			if err := s.load(BucketHosts, e.Key(), e.Value()); err != nil {
				return nil, err
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
}
