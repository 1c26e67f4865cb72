package lan

import (
	"fmt"
	"io"
	"sort"
	"strings"
)

// WriteMetrics writes the switch's counters in the Prometheus text exposition format.
func (s *Switch) WriteMetrics(w io.Writer) error {
	var b strings.Builder
	cs := s.Counters()
	type metric struct {
		name, help string
		get        func(PortCounters) uint64
	}
	ms := []metric{
		{"virtkit_switch_rx_frames_total", "Frames received from the guest on a port.", func(c PortCounters) uint64 { return c.RxFrames }},
		{"virtkit_switch_rx_bytes_total", "Bytes received from the guest on a port.", func(c PortCounters) uint64 { return c.RxBytes }},
		{"virtkit_switch_tx_frames_total", "Frames sent to the guest on a port.", func(c PortCounters) uint64 { return c.TxFrames }},
		{"virtkit_switch_tx_bytes_total", "Bytes sent to the guest on a port.", func(c PortCounters) uint64 { return c.TxBytes }},
		{"virtkit_switch_connects_total", "Guest connections accepted on a port.", func(c PortCounters) uint64 { return c.Connects }},
		{"virtkit_switch_rx_partial_frames_total", "Frames received with a partial TCP/UDP checksum (offload negotiated).", func(c PortCounters) uint64 { return c.RxPartial }},
		{"virtkit_switch_tx_partial_frames_total", "Frames sent with a partial TCP/UDP checksum (offload negotiated).", func(c PortCounters) uint64 { return c.TxPartial }},
		{"virtkit_switch_tx_checksums_completed_total", "Partial-checksum frames the switch completed for a peer without offload.", func(c PortCounters) uint64 { return c.TxCompleted }},
	}
	for _, m := range ms {
		fmt.Fprintf(&b, "# HELP %s %s\n# TYPE %s counter\n", m.name, m.help, m.name)
		for _, c := range cs {
			fmt.Fprintf(&b, "%s{port=%q} %d\n", m.name, c.Name, m.get(c))
		}
	}
	fmt.Fprintf(&b, "# HELP virtkit_switch_drops_total Frames dropped on a port, by reason.\n# TYPE virtkit_switch_drops_total counter\n")
	for _, c := range cs {
		reasons := make([]string, 0, len(c.Drops))
		for r := range c.Drops {
			reasons = append(reasons, r)
		}
		sort.Strings(reasons)
		for _, r := range reasons {
			fmt.Fprintf(&b, "virtkit_switch_drops_total{port=%q,reason=%q} %d\n", c.Name, r, c.Drops[r])
		}
	}
	fmt.Fprintf(&b, "# HELP virtkit_switch_port_connected Whether a guest is connected to the port.\n# TYPE virtkit_switch_port_connected gauge\n")
	for _, c := range cs {
		v := 0
		if c.Connected {
			v = 1
		}
		fmt.Fprintf(&b, "virtkit_switch_port_connected{port=%q} %d\n", c.Name, v)
	}
	g := s.GatewayCounters()
	fmt.Fprintf(&b, "# HELP virtkit_switch_gateway_policy_refusals_total Guest flows refused by the egress policy.\n# TYPE virtkit_switch_gateway_policy_refusals_total counter\nvirtkit_switch_gateway_policy_refusals_total %d\n", g.PolicyRefusals)
	fmt.Fprintf(&b, "# HELP virtkit_switch_gateway_flows Egress flows (TCP connections, UDP flows) open now.\n# TYPE virtkit_switch_gateway_flows gauge\nvirtkit_switch_gateway_flows %d\n", g.Flows)
	fmt.Fprintf(&b, "# HELP virtkit_switch_gateway_flow_limit_refusals_total Egress flows refused because MaxFlows were open.\n# TYPE virtkit_switch_gateway_flow_limit_refusals_total counter\nvirtkit_switch_gateway_flow_limit_refusals_total %d\n", g.FlowLimitRefusals)
	fmt.Fprintf(&b, "# HELP virtkit_switch_gateway_unknown_dest_total Gateway frames for MACs no port has.\n# TYPE virtkit_switch_gateway_unknown_dest_total counter\nvirtkit_switch_gateway_unknown_dest_total %d\n", g.UnknownDest)
	_, err := io.WriteString(w, b.String())
	return err
}

// GatewayCounters are the gateway's own counters.
type GatewayCounters struct {
	PolicyRefusals uint64 // TCP/UDP/ICMP flows refused by policy
	UnknownDest    uint64 // frames the gateway sent to MACs no port has
	// Flows is the number of egress flows open now; FlowLimitRefusals counts flows refused at
	// Config.MaxFlows.
	Flows             int64
	FlowLimitRefusals uint64
}

// GatewayCounters returns the gateway's counters.
func (s *Switch) GatewayCounters() GatewayCounters {
	return GatewayCounters{PolicyRefusals: s.policyDrops.Load(), UnknownDest: s.gwDrops.Load(),
		Flows: s.flows.Load(), FlowLimitRefusals: s.flowDrops.Load()}
}
