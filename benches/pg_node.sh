#!/usr/bin/env bash
# One node on PostgreSQL meeting KEYS keys: its first second cold, then its rate once warm, for
# one build or several compared round by round. Each round starts a new PostgreSQL server and
# database, mints the keys, starts the node, loads it with the keys in turn for 1 s (cold),
# then WARM s, then measures MEASURE s (warm). Builds alternate within a round, so a noisy
# machine hits them alike; read the ratios pair by pair.
#
#   benches/pg_node.sh                         # target/release
#   benches/pg_node.sh /tmp/old /tmp/new       # two builds (each a dir with tollgate and
#                                              # examples/mint_keys), alternating
#
# ROUNDS (3), KEYS (10000), CONNS (32), WARM (12), MEASURE (5). Needs nginx, wrk, curl and
# PostgreSQL's server programs (compare.sh installs the first three).
set -euo pipefail

ROUNDS=${ROUNDS:-3}
KEYS=${KEYS:-10000}
CONNS=${CONNS:-32}
WARM=${WARM:-12}
MEASURE=${MEASURE:-5}

root=$(cd "$(dirname "$0")/.." && pwd)
bench=pg_node
builds=("$@")
[ ${#builds[@]} -gt 0 ] || builds=("${CARGO_TARGET_DIR:-$root/target}/release")
for b in "${builds[@]}"; do
    if [ ! -x "$b/tollgate" ] || [ ! -x "$b/examples/mint_keys" ]; then
        echo "$bench: $b has no tollgate and examples/mint_keys (cargo build --release --examples)" >&2
        exit 2
    fi
done
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
[ -n "$pg_bin" ] || { echo "$bench: no PostgreSQL server programs" >&2; exit 2; }

. "$root/benches/lib.sh"

pids=()
work=""
finish_round() {
    stop_all
    [ -n "$work" ] && stop_postgres
    [ -n "$work" ] && rm -rf "$work"
    work=""
}
trap finish_round EXIT

# wrk's req/s (and its non-2xx count, if any) for `$1` seconds on the node at port `$2`.
load() { # seconds port
    wrk -t1 -c"$CONNS" -d"$1"s -s "$work/rotate.lua" "http://127.0.0.1:$2/" 2>&1 |
        awk '/Requests\/sec/ {r=$2} /Non-2xx/ {n=$NF} END {printf "%s%s", r, (n ? " (" n " not 2xx)" : "")}'
}

printf '%-6s %-40s %12s %12s %7s\n' round build "first s" warm ratio
for round in $(seq 1 "$ROUNDS"); do
    for b in "${builds[@]}"; do
        work=$(mktemp -d /tmp/tollgate-pg-node.XXXXXX)
        up=$(port)
        start_app "$up"
        pids+=("$app_pid")
        wait_http "http://127.0.0.1:$up/"
        start_postgres
        "$b/examples/mint_keys" "$pg_url" "$KEYS" 100000 "$work/keys.txt" loadtest >/dev/null
        rotate_keys "$work/keys.txt" "$work/rotate.lua"
        node=$(port)
        cat >"$work/node.toml" <<EOF
[proxy]
listen = "127.0.0.1:$node"
upstream = "127.0.0.1:$up"
threads = 1
grace_period_s = 1
[admin]
listen = "127.0.0.1:$(port)"
[metrics]
listen = "127.0.0.1:$(port)"
[storage]
backend = "postgres"
log_queue_capacity = 1000000
[[plans]]
name = "free"
[[plans]]
name = "loadtest"
EOF
        TOLLGATE_DATABASE_URL="$pg_url" RUST_LOG=warn "$b/tollgate" serve \
            --config "$work/node.toml" >"$work/node.log" 2>&1 &
        pids+=($!)
        # up when it answers anything (a keyless request: 401, no key met)
        wait_http "http://127.0.0.1:$node/"
        first=$(load 1 "$node")
        load "$WARM" "$node" >/dev/null
        warm=$(load "$MEASURE" "$node")
        ratio=$(python3 -c "import sys; f, w = (float((x.split() or ['0'])[0]) for x in sys.argv[1:]); print(f'{f / w:.2f}' if w else '-')" "$first" "$warm")
        printf '%-6s %-40s %12s %12s %7s\n' "$round" "$b" "$first" "$warm" "$ratio"
        finish_round
    done
done
