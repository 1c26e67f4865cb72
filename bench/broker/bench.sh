#!/usr/bin/env bash
# bench/broker/bench.sh — the event backbone on this machine, virtkit's broker package side by
# side with plain nats.go JetStream (the peer) on the same embedded nats-server (file store):
# persisted events/s (pipelined publishes, acknowledged = on disk) and publish→consume latency
# p50/p99 (one event at a time), plus core NATS as the non-persisted floor and the projector's
# rate. Usage: bench/broker/bench.sh [N events per benchmark, default 20000]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-20000}
out=$(go test -run '^$' -bench . -benchtime "${n}x" -count 1 ./bench/broker/)
echo "$out" | grep -E '^(cpu|Benchmark)'
echo
echo "$out" | awk '
  /^Benchmark/ {
    name = $1; sub(/^Benchmark/, "", name); sub(/-[0-9]+$/, "", name)
    for (i = 3; i < NF; i++) { v[name, $(i+1)] = $i }
  }
  END {
    ours = v["PersistVirtkit", "events/s"]; peer = v["PersistRawJetStream", "events/s"]
    printf "persisted events/s      virtkit %8.0f   raw JetStream %8.0f   ratio %.2f\n", ours, peer, ours / peer
    for (q = 0; q < 2; q++) {
      k = q ? "p99-µs" : "p50-µs"
      o = v["LatencyVirtkit", k]; p = v["LatencyRawJetStream", k]; c = v["LatencyCoreNATS", k]
      printf "publish→consume %-7s virtkit %6.0f µs  raw JetStream %6.0f µs  ratio %.2f   (core NATS, not persisted: %.0f µs)\n", k, o, p, o / p, c
    }
    printf "projector (log → KV)    %8.0f events/s\n", v["Projector", "events/s"]
  }'
