// Package broker is virtkit's event backbone on NATS JetStream: the embedded server, the client
// connection, the streams and KV buckets declared in code, the typed event envelope, work-queue
// consumption and the KV projections of the event log.
//
// # API summary
//
// Server and connection:
//
//	srv, err := broker.StartServer(ctx, broker.ServerConfig{StateDir: dir})  // embedded, 127.0.0.1 only, nkey credential 0600
//	c, err := broker.Connect(ctx, srv.ClientConfig())                        // or broker.Config{URL, Creds, TLS…}
//	c, err := broker.ConnectLocal(ctx, stateDir)                            // the daemon's endpoint file; errors.Is(err, broker.ErrNoDaemon)
//	broker.WriteEndpoint / ReadEndpoint / RemoveEndpoint                     // <state>/broker/endpoint.json, 0600
//	c.Drain(ctx); srv.Shutdown(ctx)
//
// Resources (DESIGN.md): VIRTKIT_EVENTS (vk.evt.<aggregate>.<id>.<type>, limits, dedupe window),
// VIRTKIT_WORK (vk.work.…, work-queue), VIRTKIT_EXEC (vk.exec.<id>.{stdout,stderr,exit}, 1h), KV
// vk_vms, vk_images, vk_jobs, vk_hosts (TTL). DefaultSchema declares them as plain jetstream config
// structs; Provision creates or updates them idempotently.
//
// Events: one Go type per event type (VMStarting, VMReady, VMStopped, VMFailed, ImageConverting,
// ImageConverted, ImageFailed, JobQueued, JobStarted, JobSucceeded, JobFailed, JobCanceled,
// HostHeartbeat, HostStopped), carried in an Envelope with CloudEvents attributes (specversion, id,
// type, source host, subject, time) and a versioned body.
//
//	env, err := c.Publish(ctx, &broker.VMReady{VM: "web1", IP: "10.77.0.5"})  // Nats-Msg-Id = env.ID
//	_, err = c.PublishEnvelope(ctx, env)                                      // a safe retry: stored once
//	b := c.NewBatch(); b.Add(env); dups, err := b.Wait(ctx)                   // pipelined publishes
//	sub, err := c.Subscribe(ctx, broker.SubscribeOptions{Filters: []string{broker.EventFilter("vm", "web1", "")}},
//		func(ctx context.Context, env *broker.Envelope, ev broker.Event) error { … })
//	sub.Stop(); sub.Drain(); <-sub.Closed()
//	seq, _ := c.LastEventSeq(ctx) // then submit, then Subscribe{StartSeq: seq + 1}: no gap
//
// Work: c.Submit(ctx, broker.WorkVMLaunch, id, body) queues an item once per id. A host consumes
// with c.ConsumeWork(ctx, broker.WorkOptions{Subject, Slots}, handler) (handle with Drain/Stop/
// Closed) or c.RunWork (blocking, for a worker's Run). Items are fetched only while the host's
// Slots have free capacity, acked only when the handler returns nil, terminated on a Permanent
// error, retried with back-off otherwise, kept alive with progress reports while running, and
// redelivered AckWait after a host dies. Shutdown drains: in-flight items finish or are handed back.
//
// Projections: State.Apply is the fold of events into the four tables; Projector (a worker) keeps
// the KV tables current with compare-and-set writes, following the log with an ordered consumer
// from its checkpoint in vk_checkpoints (ProjectionLag says how far behind it is); Replay folds the log from the start,
// ReadProjection reads the KV tables, RebuildProjection replaces them with a replay. Replay and
// the live projection give the same state because rows only depend on the events (their time
// and sequence), never on the reader's clock.
//
// Concurrency: Client, Slots and Batch are safe for concurrent use. Handlers of one Subscription
// are called from one goroutine in log order; work handlers run concurrently, one goroutine per
// item, up to the free Slots. Every goroutine the package starts ends when its handle is stopped
// or drained, or its ctx ends.
package broker
