package cli

import (
	"context"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"
	"time"

	"github.com/rs/zerolog"
	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/broker"
	"github.com/virtkit/virtkit/cmd/virtkit/config"
	"github.com/virtkit/virtkit/workers"
)

// daemon is what a worker factory gets from `virtkit serve`: the connected broker client, this
// host's capacity slots, the configuration and the logger.
type daemon struct {
	Client *broker.Client
	Slots  *broker.Slots
	Config *config.Config
	Log    zerolog.Logger
	// Supervisor runs the workers; Status is safe to call from workers.
	Supervisor *workers.Supervisor
}

// workerFactory builds one worker for the daemon. Other files add theirs from init with
// registerWorker (e.g. serve_launcher.go), so serve.go need not change when a worker lands.
type workerFactory func(ctx context.Context, d *daemon) (workers.Worker, error)

// workerFactories and workerNames are parallel: factory i builds the worker called workerNames[i].
var (
	workerFactories []workerFactory
	workerNames     []string
)

// builtinWorkers are the daemon's own workers, always known to --workers.
var builtinWorkers = []string{"projector", "heartbeat"}

// registerWorker adds a worker called name (what `serve --workers` selects it by, and what
// status shows) to the daemon.
func registerWorker(name string, f workerFactory) {
	workerFactories = append(workerFactories, f)
	workerNames = append(workerNames, name)
}

// selectWorkers parses --workers: "all", or a comma-separated list of worker names.
func selectWorkers(list string) (func(string) bool, error) {
	if list == "" || list == "all" {
		return func(string) bool { return true }, nil
	}
	known := map[string]bool{}
	for _, n := range builtinWorkers {
		known[n] = true
	}
	for _, n := range workerNames {
		known[n] = true
	}
	want := map[string]bool{}
	for _, n := range strings.Split(list, ",") {
		n = strings.TrimSpace(n)
		if !known[n] {
			names := make([]string, 0, len(known))
			for k := range known {
				names = append(names, k)
			}
			sort.Strings(names)
			return nil, fmt.Errorf("--workers: no worker %q (have %s)", n, strings.Join(names, ", "))
		}
		want[n] = true
	}
	return func(n string) bool { return want[n] }, nil
}

func init() {
	register(func(e *env) *cobra.Command {
		var (
			natsURL, creds, tlsCA, tlsCert, tlsKey string
			port, replicas                         int
			heartbeat                              time.Duration
			workerList                             string
			rebuild                                bool
		)
		cmd := &cobra.Command{
			Use:   "serve",
			Short: "Run the daemon: embedded NATS broker and the workers",
			Long: `Run the host daemon. Without --nats (or nats.url in the config) it embeds a NATS server with
JetStream: file store under the state dir, listening on 127.0.0.1 only, with a generated credential
(0600). With --nats it joins an existing server or cluster instead. Either way it provisions the
streams and KV buckets, runs the workers, and writes <state-dir>/broker/endpoint.json so local
clients (virtkit status, run, …) find it. SIGTERM or SIGINT drains the workers and stops cleanly.`,
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				c := e.cfg
				f := cmd.Flags()
				set := func(name string, dst *string, v string) {
					if f.Changed(name) {
						*dst = v
					}
				}
				set("nats", &c.NATS.URL, natsURL)
				set("creds", &c.NATS.Creds, creds)
				set("tls-ca", &c.NATS.TLSCA, tlsCA)
				set("tls-cert", &c.NATS.TLSCert, tlsCert)
				set("tls-key", &c.NATS.TLSKey, tlsKey)
				if f.Changed("port") {
					c.NATS.Port = port
				}
				want, err := selectWorkers(workerList)
				if err != nil {
					return err
				}
				return serve(cmd.Context(), e, serveOpts{replicas: replicas, heartbeat: heartbeat, want: want, rebuild: rebuild})
			},
		}
		f := cmd.Flags()
		f.StringVar(&natsURL, "nats", "", "use this NATS server or cluster (nats://host:4222[,…]) instead of the embedded one")
		f.StringVar(&creds, "creds", "", "NATS credentials file (user JWT + nkey seed) for --nats")
		f.StringVar(&tlsCA, "tls-ca", "", "CA bundle to verify the NATS server")
		f.StringVar(&tlsCert, "tls-cert", "", "client certificate for NATS (with --tls-key)")
		f.StringVar(&tlsKey, "tls-key", "", "client key for NATS (with --tls-cert)")
		f.IntVar(&port, "port", 0, "port of the embedded server on 127.0.0.1 (default: nats.port, else a free port)")
		f.IntVar(&replicas, "replicas", 1, "stream and bucket replicas (3 on a NATS cluster)")
		f.DurationVar(&heartbeat, "heartbeat", 5*time.Second, "host heartbeat interval")
		f.BoolVar(&rebuild, "rebuild-projections", false, "replace the KV state tables with a replay of VIRTKIT_EVENTS before starting")
		f.StringVar(&workerList, "workers", "all", "workers to run: all, or a comma-separated list (e.g. projector,heartbeat for a broker-only node)")
		return cmd
	})
}

type serveOpts struct {
	replicas  int
	heartbeat time.Duration
	want      func(string) bool
	rebuild   bool
}

func serve(ctx context.Context, e *env, o serveOpts) (err error) {
	c, log, want := e.cfg, e.log, o.want
	host := broker.HostID(c.Host)
	if ep, err := broker.ReadEndpoint(c.StateDir); err == nil {
		// The pid is alive, but after a crash and a reboot it may be someone else's: only a
		// daemon that answers counts.
		cctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		other, err := broker.ConnectLocal(cctx, c.StateDir, broker.WithHost(host))
		cancel()
		if err == nil {
			other.Close()
			return fmt.Errorf("serve: a daemon (pid %d) already serves state dir %s", ep.PID, c.StateDir)
		}
		log.Warn().Int("pid", ep.PID).Err(err).Msg("replacing the endpoint file of a daemon that does not answer")
	}
	if err := os.MkdirAll(c.StateDir, 0o700); err != nil {
		return fmt.Errorf("serve: state dir: %w", err)
	}

	// The broker: embedded, or an existing server.
	var (
		bcfg broker.Config
		srv  *broker.Server
	)
	if c.NATS.URL == "" {
		srv, err = broker.StartServer(ctx, broker.ServerConfig{StateDir: c.StateDir, Port: c.NATS.Port, Name: "virtkit-" + host, Log: log})
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		defer func() {
			sctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			if serr := srv.Shutdown(sctx); serr != nil {
				log.Error().Err(serr).Msg("broker shutdown")
			}
			log.Info().Msg("broker stopped")
		}()
		bcfg = srv.ClientConfig()
	} else {
		bcfg = broker.Config{URL: c.NATS.URL, Creds: c.NATS.Creds, TLSCA: c.NATS.TLSCA, TLSCert: c.NATS.TLSCert, TLSKey: c.NATS.TLSKey}
	}
	conn := bcfg
	conn.Host, conn.Name, conn.Log = host, "virtkit serve "+host, log
	cctx, cancel := context.WithTimeout(ctx, 15*time.Second)
	client, err := broker.Connect(cctx, conn)
	cancel()
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer func() {
		dctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if derr := client.Drain(dctx); derr != nil {
			log.Warn().Err(derr).Msg("broker client drain")
		}
	}()
	pctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	err = broker.Provision(pctx, client.JetStream(), broker.DefaultSchema(broker.SchemaOptions{Replicas: o.replicas}))
	cancel()
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	if o.rebuild {
		st, err := broker.RebuildProjection(ctx, client)
		if err != nil {
			return fmt.Errorf("serve: %w", err)
		}
		log.Info().Int("vms", len(st.VMs)).Int("images", len(st.Images)).Int("jobs", len(st.Jobs)).Int("hosts", len(st.Hosts)).
			Msg("rebuilt the state tables from the event log")
	}

	// The workers.
	sup := workers.New(workers.Config{Log: log})
	d := &daemon{Client: client, Slots: broker.NewSlots(c.VM.Capacity), Config: c, Log: log, Supervisor: sup}
	if want("projector") {
		sup.Add(broker.NewProjector(client, log))
	}
	if want("heartbeat") {
		sup.Add(workers.NewHeartbeat(client, workers.HeartbeatConfig{Supervisor: sup, Slots: d.Slots, Version: Version, Interval: o.heartbeat, Log: log}))
	}
	for i, f := range workerFactories {
		if !want(workerNames[i]) {
			continue
		}
		w, err := f(ctx, d)
		if err != nil {
			return fmt.Errorf("serve: worker %s: %w", workerNames[i], err)
		}
		if w != nil {
			sup.Add(w)
		}
	}

	// Tell local clients where we are, once everything is ready.
	ep := broker.Endpoint{Config: bcfg, PID: os.Getpid(), Started: time.Now().UTC(), Embedded: srv != nil}
	if err := broker.WriteEndpoint(c.StateDir, ep); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	defer broker.RemoveEndpoint(c.StateDir)
	log.Info().Str("url", bcfg.URL).Str("host", host).Bool("embedded", srv != nil).Int("pid", ep.PID).
		Str("endpoint", broker.EndpointPath(c.StateDir)).Msg("virtkit serve ready")

	err = sup.Run(ctx)
	log.Info().Msg("workers stopped")
	if err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// connectBroker connects a client command to the configured cluster (nats.url) or, by default,
// to the local daemon found in the state dir. ep is the local endpoint, nil for a cluster.
func (e *env) connectBroker(ctx context.Context) (*broker.Client, *broker.Endpoint, error) {
	c := e.cfg
	host := broker.HostID(c.Host)
	if c.NATS.URL != "" {
		cl, err := broker.Connect(ctx, broker.Config{URL: c.NATS.URL, Creds: c.NATS.Creds, TLSCA: c.NATS.TLSCA,
			TLSCert: c.NATS.TLSCert, TLSKey: c.NATS.TLSKey, Host: host, Log: e.log})
		return cl, nil, err
	}
	ep, err := broker.ReadEndpoint(c.StateDir)
	if err != nil {
		if errors.Is(err, broker.ErrNoDaemon) {
			return nil, nil, &ExitError{Code: 3, Err: err}
		}
		return nil, nil, err
	}
	cl, err := broker.ConnectLocal(ctx, c.StateDir, broker.WithHost(host), broker.WithLogger(e.log))
	return cl, ep, err
}
