#!/usr/bin/env bash
# bench/agent/bench.sh — exec round trip and stdout throughput: virtkit agent over a unix socket vs
# `ssh 127.0.0.1` (openssh-server on loopback) vs `nsenter`, side by side with ratios.
# Needs root, openssh-server and openssh-client. Usage: bench/agent/bench.sh [N round trips]
set -euo pipefail
cd "$(dirname "$0")/../.."
n=${1:-300}
tmp=$(mktemp -d)
sshd_pid=
cleanup() { [ -n "$sshd_pid" ] && kill "$sshd_pid" 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT

# A private sshd on a loopback port, key-only, for root.
ssh-keygen -q -t ed25519 -N '' -f "$tmp/host" >/dev/null
ssh-keygen -q -t ed25519 -N '' -f "$tmp/user" >/dev/null
mkdir -p /root/.ssh && chmod 700 /root/.ssh
touch /root/.ssh/authorized_keys
keyline=$(cat "$tmp/user.pub")
grep -qxF "$keyline" /root/.ssh/authorized_keys || echo "$keyline" >> /root/.ssh/authorized_keys
mkdir -p /run/sshd
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
/usr/sbin/sshd -D -e -p "$port" -o ListenAddress=127.0.0.1 -h "$tmp/host" -o PermitRootLogin=prohibit-password \
  -o PasswordAuthentication=no -o UsePAM=no -o UseDNS=no -o AuthorizedKeysFile=/root/.ssh/authorized_keys 2>"$tmp/sshd.log" &
sshd_pid=$!
sleep 0.5
export BENCH_SSH_PORT=$port BENCH_SSH_KEY=$tmp/user

go test -run '^$' -bench '^Benchmark(ExecTrue|CLIExecTrue|NsenterTrue|LocalTrue)$' -benchtime "${n}x" ./bench/agent/ | tee "$tmp/lat.txt"
# ssh is ~100x slower: fewer rounds keep the run short.
go test -run '^$' -bench '^BenchmarkSSHTrue$' -benchtime "$(( n / 10 + 5 ))x" ./bench/agent/ | tee -a "$tmp/lat.txt"
go test -run '^$' -bench '^Benchmark(Stdout|SSHStdout|NsenterStdout)$' -benchtime 3x ./bench/agent/ | tee "$tmp/tput.txt"
sed -i "\|^${keyline}\$|d" /root/.ssh/authorized_keys

# Optional: the same in a QEMU microVM over hybrid vsock (VM=1; slow under TCG).
if [ "${VM:-0}" = 1 ]; then
  go test -run '^$' -bench '^BenchmarkVM' -benchtime 10x -timeout 60m ./bench/agent/ | tee "$tmp/vm.txt"
fi

# Summary with ratios against the agent.
awk '
  /^Benchmark.*True/ { name=$1; sub(/^Benchmark/,"",name); sub(/-[0-9]+$/,"",name);
    for (i=1;i<=NF;i++) { if ($(i)=="p50-µs") p50[name]=$(i-1); if ($(i)=="p99-µs") p99[name]=$(i-1) } }
  END {
    printf "\nexec round trip of `true` (p50 / p99, µs):\n"
    base=p50["CLIExecTrue"]
    n=split("ExecTrue CLIExecTrue SSHTrue NsenterTrue LocalTrue", order, " ")
    for (k=1;k<=n;k++) { x=order[k]; if (x in p50) printf "  %-14s %8d / %8d   %6.2fx the agent CLI\n", x, p50[x], p99[x], p50[x]/base }
  }' "$tmp/lat.txt"
awk '
  /^Benchmark.*Stdout/ { name=$1; sub(/^Benchmark/,"",name); sub(/-[0-9]+$/,"",name);
    for (i=1;i<=NF;i++) if ($(i)=="MB/s") mb[name]=$(i-1) }
  END {
    printf "\nstdout throughput (1 GiB, MB/s):\n"
    n=split("Stdout SSHStdout NsenterStdout", order, " ")
    for (k=1;k<=n;k++) { x=order[k]; if (x in mb) printf "  %-14s %8.0f   %6.2fx the agent\n", x, mb[x], mb[x]/mb["Stdout"] }
  }' "$tmp/tput.txt"
if [ -s "$tmp/vm.txt" ] 2>/dev/null; then
  awk '
    /^BenchmarkVMExecTrue/ { for (i=1;i<=NF;i++) { if ($(i)=="p50-µs") p50=$(i-1); if ($(i)=="p99-µs") p99=$(i-1) } }
    /^BenchmarkVM(Stdout|GuestPipe)/ { name=$1; sub(/-[0-9]+$/,"",name); for (i=1;i<=NF;i++) if ($(i)=="MB/s") mb[name]=$(i-1) }
    END {
      printf "\nin a microVM over hybrid vsock:\n  exec true p50 / p99: %d / %d µs\n", p50, p99
      printf "  stdout %.2f MB/s vs an in-guest pipe %.2f MB/s (%.2fx)\n", mb["BenchmarkVMStdout"], mb["BenchmarkVMGuestPipe"], mb["BenchmarkVMStdout"]/mb["BenchmarkVMGuestPipe"]
    }' "$tmp/vm.txt"
fi
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -buildid=" -o "$tmp/virtkit-agent" ./cmd/virtkit-agent
printf "\nagent binary (stripped, static): %.2f MiB\n" "$(echo "$(stat -c %s "$tmp/virtkit-agent") / 1048576" | bc -l)"
