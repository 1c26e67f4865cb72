package cli

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"github.com/virtkit/virtkit/switch/lan"
)

func init() {
	register(func(e *env) *cobra.Command {
		var (
			listens, hosts, allows, denies, forwards, upstream []string
			subnet, gateway, domain, metrics                   string
			mtu                                                int
			allowLoop, noOffload                               bool
		)
		cmd := &cobra.Command{
			Use:   "switch",
			Short: "Run the userspace L2 switch and gateway",
			Long: `Run virtkit's userspace LAN standalone: an L2 switch whose ports are unix stream sockets
carrying length-prefixed Ethernet frames (QEMU "-netdev stream" / gvproxy "-listen-qemu" framing),
and a gateway with DHCP, DNS (<name>.lan), and TCP/UDP/ICMP egress through ordinary host sockets.
Guests connect with "virtkit-agent net --connect unix:///PATH".`,
			Example: `  virtkit switch --listen unix:///tmp/vm1.sock,name=vm1 --listen unix:///tmp/vm2.sock,name=vm2,ip=10.77.0.20 \
      --forward tcp:127.0.0.1:8080=vm1:80 --host db=10.77.0.20`,
			Args: cobra.NoArgs,
			RunE: func(cmd *cobra.Command, args []string) error {
				cfg := lan.Config{Domain: domain, MTU: mtu, AllowHostLoopback: allowLoop, NoOffload: noOffload, Logger: e.log, DNSHosts: map[string]netip.Addr{}}
				sn := subnet
				if sn == "" {
					sn = e.cfg.Net.Subnet
				}
				var err error
				if cfg.Subnet, err = netip.ParsePrefix(sn); err != nil {
					return fmt.Errorf("--subnet: %w", err)
				}
				if gateway != "" {
					if cfg.Gateway, err = netip.ParseAddr(gateway); err != nil {
						return fmt.Errorf("--gateway: %w", err)
					}
				}
				for _, h := range hosts {
					n, a, ok := strings.Cut(h, "=")
					ip, err := netip.ParseAddr(a)
					if !ok || n == "" || err != nil {
						return fmt.Errorf("--host %q: want NAME=IP", h)
					}
					cfg.DNSHosts[n] = ip
				}
				for _, s := range allows {
					p, err := parsePrefix(s)
					if err != nil {
						return fmt.Errorf("--allow: %w", err)
					}
					cfg.Allow = append(cfg.Allow, p)
				}
				for _, s := range denies {
					p, err := parsePrefix(s)
					if err != nil {
						return fmt.Errorf("--deny: %w", err)
					}
					cfg.Deny = append(cfg.Deny, p)
				}
				for _, s := range forwards {
					f, err := lan.ParseForward(s)
					if err != nil {
						return err
					}
					cfg.Forwards = append(cfg.Forwards, f)
				}
				for _, s := range upstream {
					ap, err := netip.ParseAddrPort(s)
					if err != nil {
						a, err2 := netip.ParseAddr(s)
						if err2 != nil {
							return fmt.Errorf("--dns-upstream %q: want IP or IP:PORT", s)
						}
						ap = netip.AddrPortFrom(a, 53)
					}
					cfg.DNSUpstream = append(cfg.DNSUpstream, ap)
				}
				type portSpec struct {
					path  string
					lease lan.Lease
				}
				var ports []portSpec
				for _, l := range listens {
					path, lease, err := lan.ParseListen(l)
					if err != nil {
						return err
					}
					ports = append(ports, portSpec{path, lease})
				}
				sw, err := lan.New(cfg)
				if err != nil {
					return err
				}
				for _, p := range ports {
					port, err := sw.ListenPort(p.path, p.lease)
					if err != nil {
						sw.Close()
						return err
					}
					defer os.Remove(p.path)
					e.log.Info().Str("port", port.Name()).Str("ip", port.IP().String()).Str("socket", p.path).Msg("port ready")
				}
				ctx := cmd.Context()
				if metrics != "" {
					stop, err := serveMetrics(ctx, metrics, sw)
					if err != nil {
						sw.Close()
						return err
					}
					defer stop()
				}
				gw, mac := sw.Gateway()
				e.log.Info().Str("subnet", cfg.Subnet.String()).Str("gateway", gw.String()).Str("gateway_mac", mac.String()).Msg("switch running")
				return sw.Run(ctx)
			},
		}
		f := cmd.Flags()
		f.StringArrayVar(&listens, "listen", nil, "port socket: unix:///PATH[,name=N,mac=M,ip=A] (repeatable)")
		f.StringVar(&subnet, "subnet", "", "LAN subnet (default from config net.subnet: 10.77.0.0/24)")
		f.StringVar(&gateway, "gateway", "", "gateway address (default: first address of the subnet)")
		f.StringVar(&domain, "domain", "lan", "DNS domain of the LAN")
		f.IntVar(&mtu, "mtu", 1500, "MTU handed out by DHCP and used by the gateway (up to 65520)")
		f.StringArrayVar(&hosts, "host", nil, "extra DNS name NAME=IP under the LAN domain (repeatable)")
		f.BoolVar(&allowLoop, "allow-host-loopback", false, "let guests reach the host's loopback through the gateway address")
		f.StringArrayVar(&allows, "allow", nil, "CIDR guests may reach even if denied by default (repeatable)")
		f.StringArrayVar(&denies, "deny", nil, "CIDR guests may not reach (repeatable)")
		f.StringArrayVar(&forwards, "forward", nil, "host→guest TCP forward tcp:HOST:PORT=NAME:PORT (repeatable)")
		f.StringArrayVar(&upstream, "dns-upstream", nil, "resolver for names outside the LAN (default: /etc/resolv.conf)")
		f.BoolVar(&noOffload, "no-offload", false, "send TCP to guests in MTU-sized frames only (for peers that drop frames above the MTU)")
		f.StringVar(&metrics, "metrics", "", "serve Prometheus metrics (/metrics) and counters (/counters) on this host:port")
		return cmd
	})
}

func parsePrefix(s string) (netip.Prefix, error) {
	if p, err := netip.ParsePrefix(s); err == nil {
		return p.Masked(), nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return netip.Prefix{}, fmt.Errorf("%q: want a CIDR or an address", s)
	}
	return netip.PrefixFrom(a, a.BitLen()), nil
}

func serveMetrics(ctx context.Context, listen string, sw *lan.Switch) (func(), error) {
	l, err := net.Listen("tcp", listen)
	if err != nil {
		return nil, fmt.Errorf("--metrics: %w", err)
	}
	mux := http.NewServeMux()
	mux.HandleFunc("/metrics", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/plain; version=0.0.4")
		sw.WriteMetrics(w)
	})
	mux.HandleFunc("/counters", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		json.NewEncoder(w).Encode(map[string]any{"ports": sw.Counters(), "gateway": sw.GatewayCounters()})
	})
	srv := &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := srv.Serve(l); err != nil && !errors.Is(err, http.ErrServerClosed) {
			_ = err
		}
	}()
	return func() {
		sctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		defer cancel()
		srv.Shutdown(sctx)
		<-done
	}, nil
}
