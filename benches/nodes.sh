#!/usr/bin/env bash
#! `benches/nodes.sh`: one Tollgate node against three on one PostgreSQL database, each behind
#! HAProxy (round-robin), loaded with wrk in alternating rounds on this machine; prints the
#! table for benches/RESULTS.md.
#
# A throwaway PostgreSQL server (initdb into the work directory, loopback, its own port; as the
# `postgres` user when run as root), nginx as the app, HAProxy in front. Each node has one proxy
# thread; keys are minted into the database first (one key, and KEYS keys rotated by a wrk Lua
# script). Everything listens on 127.0.0.1, every load has a fixed duration, and every process
# this script starts is stopped when it exits, by its own pid.
#
# Each load also counts the database's committed transactions (pg_stat_database) and the nodes'
# lease requests (tollgate_lease_requests_total), per second of load: what the lease size costs.
#
# Settings (environment): DURATION (s, default 10), ROUNDS (3), CONNS (32), KEYS (1000),
# LEASE_MS (the nodes' [cluster] lease_ms, default 30000).
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
KEYS=${KEYS:-1000}
LEASE_MS=${LEASE_MS:-30000}

root=$(cd "$(dirname "$0")/.." && pwd)
bench=nodes
work=$(mktemp -d /tmp/tollgate-nodes.XXXXXX)
chmod 755 "$work"
pids=()
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
as_pg=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"
cleanup() {
    local p
    for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$p" 2>/dev/null || true
    done
    stop_postgres
    rm -rf "$work"
}
trap cleanup EXIT INT TERM
export PATH="$PATH:/usr/sbin"

echo "nodes: building release binaries" >&2
(cd "$root" && cargo build --release --quiet --bin tollgate --example mint_keys)
bin="${CARGO_TARGET_DIR:-$root/target}/release"

# the app
up_port=$(port)
start_app "$up_port"
pids+=("$app_pid")
wait_http "http://127.0.0.1:$up_port/"

# the database
start_postgres
url=$pg_url
"$bin/examples/mint_keys" "$url" "$KEYS" 100000 "$work/keys.txt" loadtest
key1=$(head -1 "$work/keys.txt")
rotate_keys "$work/keys.txt" "$work/rotate.lua"

# the nodes: three, each with its own ports; "one" is node 0 alone behind its own HAProxy
node_ports=()
metric_ports=()
for i in 0 1 2; do
    p=$(port); a=$(port); m=$(port)
    node_ports+=("$p")
    metric_ports+=("$m")
    cat >"$work/node$i.toml" <<EOF
[proxy]
listen = "127.0.0.1:$p"
upstream = "127.0.0.1:$up_port"
threads = 1
grace_period_s = 1
[admin]
listen = "127.0.0.1:$a"
[metrics]
listen = "127.0.0.1:$m"
[storage]
backend = "postgres"
log_queue_capacity = 1000000
[[plans]]
name = "free"
[[plans]]
name = "loadtest"
[cluster]
lease_ms = $LEASE_MS
EOF
    TOLLGATE_DATABASE_URL="$url" RUST_LOG=warn "$bin/tollgate" serve --config "$work/node$i.toml" \
        >"$work/node$i.log" 2>&1 &
    pids+=($!)
done
for p in "${node_ports[@]}"; do wait_http "http://127.0.0.1:$p/" "X-License-Key: $key1"; done

haproxy_for() { # name port servers...
    local name=$1 listen=$2
    shift 2
    {
        printf 'global\n    nbthread 1\n    maxconn 4096\n'
        printf 'defaults\n    mode http\n    timeout connect 5s\n    timeout client 30s\n'
        printf '    timeout server 30s\n    http-reuse always\n'
        printf 'frontend fe\n    bind 127.0.0.1:%s\n    default_backend nodes\n' "$listen"
        printf 'backend nodes\n    balance roundrobin\n'
        local i=0
        for p in "$@"; do printf '    server n%s 127.0.0.1:%s\n' "$i" "$p"; i=$((i + 1)); done
    } >"$work/$name.cfg"
    haproxy -f "$work/$name.cfg" -db -q &
    pids+=($!)
}
one_port=$(port); three_port=$(port)
haproxy_for one "$one_port" "${node_ports[0]}"
haproxy_for three "$three_port" "${node_ports[@]}"
wait_http "http://127.0.0.1:$one_port/" "X-License-Key: $key1"
wait_http "http://127.0.0.1:$three_port/" "X-License-Key: $key1"

targets=(
    "one_node_1key|$one_port|header"
    "three_nodes_1key|$three_port|header"
    "one_node_${KEYS}keys|$one_port|lua"
    "three_nodes_${KEYS}keys|$three_port|lua"
)
mkdir -p "$work/out"
db_tx() {
    "$pg_bin/psql" -h 127.0.0.1 -p "$db_port" -U "$pg_user" -d tollgate -Atc \
        "SELECT xact_commit FROM pg_stat_database WHERE datname = 'tollgate'"
}
lease_asks() { # every node's lease requests, whatever their result
    local m total=0 n
    for m in "${metric_ports[@]}"; do
        n=$(curl -s "http://127.0.0.1:$m/metrics" |
            awk '/^tollgate_lease_requests_total/ {s += $2} END {printf "%d", s}')
        total=$((total + n))
    done
    echo "$total"
}
for t in "${targets[@]}"; do
    IFS='|' read -r name p mode <<<"$t"
    extra=(-H "X-License-Key: $key1")
    [ "$mode" = lua ] && extra=(-s "$work/rotate.lua")
    wrk -t1 -c"$CONNS" -d2s "${extra[@]}" "http://127.0.0.1:$p/" >/dev/null 2>&1
done
for round in $(seq 1 "$ROUNDS"); do
    for t in "${targets[@]}"; do
        IFS='|' read -r name p mode <<<"$t"
        echo "nodes:   round $round/$ROUNDS $name" >&2
        extra=(-H "X-License-Key: $key1")
        [ "$mode" = lua ] && extra=(-s "$work/rotate.lua")
        tx0=$(db_tx); asks0=$(lease_asks)
        wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "${extra[@]}" "http://127.0.0.1:$p/" \
            >"$work/out/$name.$round.txt" 2>&1
        echo "db $(($(db_tx) - tx0)) $(($(lease_asks) - asks0))" >>"$work/out/$name.$round.txt"
    done
done

python3 - "$work/out" "$CONNS" "$DURATION" "$ROUNDS" "$KEYS" "$LEASE_MS" <<'EOF'
import glob, os, re, statistics, sys
out, conns, duration, rounds, keys, lease_ms = sys.argv[1:7]
unit = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}
runs = {}
for path in glob.glob(os.path.join(out, "*.txt")):
    name = os.path.basename(path).split(".")[0]
    text = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    p99 = [float(v) * unit[u] for pct, v, u in re.findall(r"^\s+(99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    tx, asks = (int(v) for v in re.search(r"^db (\d+) (\d+)$", text, re.M).groups())
    runs.setdefault(name, []).append((rps, p99[0] if p99 else float("nan"), int(bad.group(1)) if bad else 0,
                                      tx / float(duration), asks / float(duration)))
print(f"wrk 1 thread, {conns} connections, {duration} s per load, {rounds} alternating rounds, "
      f"medians; every node one proxy thread; HAProxy 1 thread in front of each setup; "
      f"PostgreSQL, nginx, HAProxy, the nodes and wrk share the machine's {os.cpu_count()} cores. "
      f"lease_ms = {lease_ms}. The database's transactions and the lease requests are of all "
      f"three nodes (an idle node still heartbeats and flushes), per second of load.")
print()
print("| target | req/s | p99 µs | non-2xx | db tx/s | lease requests/s |")
print("|---|---:|---:|---:|---:|---:|")
med = {}
for name in ["one_node_1key", "three_nodes_1key", f"one_node_{keys}keys", f"three_nodes_{keys}keys"]:
    r = runs.get(name)
    if not r:
        continue
    med[name] = statistics.median(x[0] for x in r)
    print(f"| {name} | {med[name]:,.0f} | {statistics.median(x[1] for x in r):,.0f} | {sum(x[2] for x in r)} "
          f"| {statistics.median(x[3] for x in r):,.1f} | {statistics.median(x[4] for x in r):,.1f} |")
print()
for k in ["1key", f"{keys}keys"]:
    a, b = med.get(f"three_nodes_{k}"), med.get(f"one_node_{k}")
    if a and b:
        print(f"- {k}: three nodes {a / b:.2f}x one node")
EOF
