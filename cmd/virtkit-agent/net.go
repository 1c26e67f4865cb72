package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log"
	"net"
	"net/netip"
	"os"
	"strings"

	"github.com/virtkit/virtkit/agent/netrelay"
)

func init() {
	register("net", "relay a tap device to the host switch and configure it", runNet)
}

func runNet(ctx context.Context, args []string) int {
	fs := flag.NewFlagSet("net", flag.ContinueOnError)
	var cfg netrelay.Config
	var mac, address, gateway, dns string
	fs.StringVar(&cfg.Connect, "connect", "", "switch endpoint URL (default vsock://2:1025)")
	fs.StringVar(&cfg.Tap, "tap", "vk0", "tap device to create")
	fs.StringVar(&cfg.NIC, "nic", "", "configure this kernel interface (e.g. eth0 on an operator's tap) instead of relaying to the switch")
	fs.IntVar(&cfg.MTU, "mtu", 0, "MTU of the tap, up to 65520 (default: what the switch's DHCP offers, else 1500)")
	fs.StringVar(&mac, "mac", "", "MAC address of the tap (default: the kernel's)")
	fs.StringVar(&cfg.Mode, "mode", "", "address configuration: dhcp (built-in client), static, or none (leave it to udhcpc); default dhcp, static when --ip is set")
	fs.StringVar(&address, "ip", "", "static address with prefix, e.g. 10.77.0.5/24")
	fs.StringVar(&gateway, "gateway", "", "static default gateway")
	fs.StringVar(&dns, "dns", "", "static DNS servers, comma separated")
	fs.StringVar(&cfg.Search, "search", "", "static DNS search domain")
	fs.StringVar(&cfg.ResolvConf, "resolv-conf", "/etc/resolv.conf", "resolv.conf to write with the DNS configuration (empty: leave alone)")
	fs.StringVar(&cfg.Hostname, "hostname", "", "host name sent in DHCP requests (default: this host's)")
	fs.BoolVar(&cfg.NoOffload, "no-offload", false, "disable the tap's TCP segmentation/checksum offload (frames then never exceed the MTU)")
	quiet := fs.Bool("quiet", false, "log only errors")
	readyFile := fs.String("ready-file", "", "write the applied address (JSON) to this file once the interface is configured")
	if err := fs.Parse(args); err != nil {
		return 2
	}
	if fs.NArg() != 0 {
		fmt.Fprintf(os.Stderr, "virtkit-agent net: unexpected arguments %q\n", fs.Args())
		return 2
	}
	bad := func(format string, a ...any) int {
		fmt.Fprintf(os.Stderr, "virtkit-agent net: "+format+"\n", a...)
		return 2
	}
	if mac != "" {
		hw, err := net.ParseMAC(mac)
		if err != nil {
			return bad("--mac: %v", err)
		}
		cfg.MAC = hw
	}
	if address != "" {
		p, err := netip.ParsePrefix(address)
		if err != nil {
			return bad("--ip: %v", err)
		}
		cfg.Address = p
		if cfg.Mode == "" {
			cfg.Mode = netrelay.ModeStatic
		}
	}
	if gateway != "" {
		a, err := netip.ParseAddr(gateway)
		if err != nil {
			return bad("--gateway: %v", err)
		}
		cfg.Gateway = a
	}
	for _, d := range strings.Split(dns, ",") {
		if d = strings.TrimSpace(d); d == "" {
			continue
		}
		a, err := netip.ParseAddr(d)
		if err != nil {
			return bad("--dns: %v", err)
		}
		cfg.DNS = append(cfg.DNS, a)
	}
	if cfg.Hostname == "" {
		cfg.Hostname, _ = os.Hostname()
	}
	logger := log.New(os.Stderr, "", log.LstdFlags|log.Lmicroseconds)
	cfg.Logf = func(format string, a ...any) {
		if !*quiet {
			logger.Printf(format, a...)
		}
	}
	if *readyFile != "" {
		cfg.Ready = func(l netrelay.Lease) {
			b, _ := json.Marshal(map[string]any{"ip": l.IP.String(), "router": l.Router.String(), "dns": l.DNS})
			tmp := *readyFile + ".tmp"
			if os.WriteFile(tmp, append(b, '\n'), 0o644) == nil {
				os.Rename(tmp, *readyFile)
			}
		}
	}
	if err := netrelay.Run(ctx, cfg); err != nil {
		fmt.Fprintln(os.Stderr, "virtkit-agent net:", err)
		return 1
	}
	return 0
}
