package broker

import (
	"context"
	"fmt"
	"strings"
	"time"

	"github.com/nats-io/nats.go/jetstream"
)

// Stream, subject and bucket names (DESIGN.md "Events and work").
const (
	EventsStream = "VIRTKIT_EVENTS"
	WorkStream   = "VIRTKIT_WORK"
	ExecStream   = "VIRTKIT_EXEC"

	EventSubjectPrefix = "vk.evt."
	WorkSubjectPrefix  = "vk.work."
	ExecSubjectPrefix  = "vk.exec."

	// Work subjects any host may take.
	WorkImageConvert = "vk.work.image.convert"
	WorkVMLaunch     = "vk.work.vm.launch"
	WorkCIJob        = "vk.work.ci.job"

	BucketVMs    = "vk_vms"
	BucketImages = "vk_images"
	BucketJobs   = "vk_jobs"
	BucketHosts  = "vk_hosts"
	// BucketCheckpoints holds each host projector's last applied event sequence.
	BucketCheckpoints = "vk_checkpoints"
)

// HostWorkSubject is work that must run on host (where a VM lives): vk.work.host.<host>.<kind>.
// kind may be ">" to match all of a host's work.
func HostWorkSubject(host, kind string) string {
	return WorkSubjectPrefix + "host." + host + "." + kind
}

// Exec channels on vk.exec.<id>.<channel>. Output channels are kept in ExecStream so a client that
// reconnects replays what it missed; input channels are plain NATS messages.
const (
	ExecStdout = "stdout"
	ExecStderr = "stderr"
	ExecExit   = "exit"
	ExecStdin  = "stdin"
	ExecResize = "resize"
	ExecSignal = "signal"
)

// ExecSubject is vk.exec.<id>.<channel>.
func ExecSubject(id, channel string) string { return ExecSubjectPrefix + id + "." + channel }

// Schema is every server-side resource virtkit needs, as plain jetstream config structs. It is
// declared once (DefaultSchema) and applied with Provision.
type Schema struct {
	Streams   []jetstream.StreamConfig
	Consumers []ConsumerSpec
	Buckets   []jetstream.KeyValueConfig
}

// ConsumerSpec is a durable consumer on Stream.
type ConsumerSpec struct {
	Stream string
	Config jetstream.ConsumerConfig
}

// SchemaOptions tune DefaultSchema. The zero value suits one host.
type SchemaOptions struct {
	// Replicas for every stream and bucket; 0 means 1. Use 3 on a NATS cluster.
	Replicas int
	// EventsMaxBytes caps VIRTKIT_EVENTS; 0 means unlimited (the log is the source of truth).
	EventsMaxBytes int64
	// DedupeWindow for VIRTKIT_EVENTS and VIRTKIT_WORK; 0 means 2 minutes.
	DedupeWindow time.Duration
	// ExecMaxAge is how long exec output is kept for reconnecting clients; 0 means 1 hour.
	ExecMaxAge time.Duration
	// HostTTL is how long a host stays in vk_hosts without a heartbeat; 0 means 30 seconds.
	HostTTL time.Duration
	// WorkAckWait is how long a taken work item may go without an ack or progress report before it
	// is redelivered (the host is presumed dead); 0 means 30 seconds.
	WorkAckWait time.Duration
	// WorkMaxAckPending caps work in flight per kind across all hosts; 0 means 1024. Each host's own
	// limit is its free capacity (see Slots).
	WorkMaxAckPending int
}

func (o SchemaOptions) withDefaults() SchemaOptions {
	if o.Replicas == 0 {
		o.Replicas = 1
	}
	if o.DedupeWindow == 0 {
		o.DedupeWindow = 2 * time.Minute
	}
	if o.ExecMaxAge == 0 {
		o.ExecMaxAge = time.Hour
	}
	if o.HostTTL == 0 {
		o.HostTTL = 30 * time.Second
	}
	if o.WorkAckWait == 0 {
		o.WorkAckWait = 30 * time.Second
	}
	if o.WorkMaxAckPending == 0 {
		o.WorkMaxAckPending = 1024
	}
	return o
}

// WorkConsumerName is the durable consumer that serves a shared work subject
// (work-image-convert for vk.work.image.convert).
func WorkConsumerName(subject string) string {
	b := []byte("work-" + subject[len(WorkSubjectPrefix):])
	for i, c := range b {
		if c == '.' || c == '*' || c == '>' {
			b[i] = '-'
		}
	}
	return strings.TrimRight(string(b), "-")
}

// WorkConsumerConfig is the consumer config for one work subject.
func WorkConsumerConfig(subject string, o SchemaOptions) jetstream.ConsumerConfig {
	o = o.withDefaults()
	return jetstream.ConsumerConfig{
		Durable:       WorkConsumerName(subject),
		Description:   "virtkit work: " + subject,
		FilterSubject: subject,
		AckPolicy:     jetstream.AckExplicitPolicy,
		AckWait:       o.WorkAckWait,
		// A retryable failure is Nak'd with a delay; after MaxDeliver attempts the item is dropped
		// and an advisory is emitted.
		MaxDeliver:    20,
		MaxAckPending: o.WorkMaxAckPending,
		DeliverPolicy: jetstream.DeliverAllPolicy,
		Replicas:      o.Replicas,
	}
}

// DefaultSchema declares virtkit's streams, shared work consumers and KV buckets.
func DefaultSchema(o SchemaOptions) Schema {
	o = o.withDefaults()
	maxBytes := o.EventsMaxBytes
	if maxBytes == 0 {
		maxBytes = -1
	}
	s := Schema{
		Streams: []jetstream.StreamConfig{{
			Name:        EventsStream,
			Description: "virtkit event log: the source of truth the KV state tables are projected from",
			Subjects:    []string{EventSubjectPrefix + ">"},
			Retention:   jetstream.LimitsPolicy,
			Storage:     jetstream.FileStorage,
			Discard:     jetstream.DiscardOld,
			MaxBytes:    maxBytes,
			MaxMsgs:     -1,
			MaxAge:      0,
			Duplicates:  o.DedupeWindow,
			Replicas:    o.Replicas,
			// Heartbeats carry a message TTL so the log does not fill up with them.
			AllowMsgTTL: true,
		}, {
			Name:        WorkStream,
			Description: "virtkit work queue: each item is taken by one host and acked when done",
			Subjects:    []string{WorkSubjectPrefix + ">"},
			Retention:   jetstream.WorkQueuePolicy,
			Storage:     jetstream.FileStorage,
			Discard:     jetstream.DiscardOld,
			MaxBytes:    -1,
			MaxMsgs:     -1,
			Duplicates:  o.DedupeWindow,
			Replicas:    o.Replicas,
		}, {
			Name:        ExecStream,
			Description: "virtkit exec output, kept briefly so reconnecting clients replay what they missed",
			Subjects: []string{
				ExecSubjectPrefix + "*." + ExecStdout,
				ExecSubjectPrefix + "*." + ExecStderr,
				ExecSubjectPrefix + "*." + ExecExit,
			},
			Retention:  jetstream.LimitsPolicy,
			Storage:    jetstream.FileStorage,
			Discard:    jetstream.DiscardOld,
			MaxAge:     o.ExecMaxAge,
			MaxBytes:   1 << 30,
			MaxMsgs:    -1,
			Duplicates: time.Minute,
			Replicas:   o.Replicas,
		}},
		Buckets: []jetstream.KeyValueConfig{
			{Bucket: BucketVMs, Description: "VM state projected from vm.* events", History: 1, Storage: jetstream.FileStorage, Replicas: o.Replicas},
			{Bucket: BucketImages, Description: "image state projected from image.* events", History: 1, Storage: jetstream.FileStorage, Replicas: o.Replicas},
			{Bucket: BucketJobs, Description: "job state projected from job.* events", History: 1, Storage: jetstream.FileStorage, Replicas: o.Replicas},
			{Bucket: BucketHosts, Description: "live hosts projected from host.* events; a host vanishes TTL after its last heartbeat",
				History: 1, Storage: jetstream.FileStorage, Replicas: o.Replicas, TTL: o.HostTTL, LimitMarkerTTL: o.HostTTL},
			{Bucket: BucketCheckpoints, Description: "last event sequence each host's projector applied", History: 1, Storage: jetstream.FileStorage, Replicas: o.Replicas},
		},
	}
	for _, subj := range []string{WorkImageConvert, WorkVMLaunch, WorkCIJob} {
		s.Consumers = append(s.Consumers, ConsumerSpec{Stream: WorkStream, Config: WorkConsumerConfig(subj, o)})
	}
	return s
}

// Provision creates or updates every stream, consumer and bucket of s. It is idempotent: run on
// every start, it leaves existing resources and their data alone and applies changed limits. A
// change the server cannot apply in place (retention or storage type) is an error naming the
// resource.
func Provision(ctx context.Context, js jetstream.JetStream, s Schema) error {
	for _, sc := range s.Streams {
		if _, err := js.CreateOrUpdateStream(ctx, sc); err != nil {
			return fmt.Errorf("broker: provision stream %s: %w", sc.Name, err)
		}
	}
	for _, cs := range s.Consumers {
		if _, err := js.CreateOrUpdateConsumer(ctx, cs.Stream, cs.Config); err != nil {
			return fmt.Errorf("broker: provision consumer %s on %s: %w", cs.Config.Durable, cs.Stream, err)
		}
	}
	for _, kc := range s.Buckets {
		if _, err := js.CreateOrUpdateKeyValue(ctx, kc); err != nil {
			return fmt.Errorf("broker: provision bucket %s: %w", kc.Bucket, err)
		}
	}
	return nil
}
