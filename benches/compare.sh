#!/usr/bin/env bash
#! `benches/compare.sh`: Tollgate side by side with the app direct, nginx, HAProxy and a bare
#! Pingora passthrough, loaded in alternating rounds on this machine; writes benches/RESULTS.md.
#
# One upstream (nginx answering 200 with a small body) serves every proxy. For each thread
# count in THREADS_LIST every proxy gets the same number of threads/workers, and each round
# loads, in turn: the upstream direct, nginx, HAProxy, bare Pingora (examples/passthrough.rs),
# Tollgate with one key, Tollgate with 10,000 keys (a wrk Lua script rotating them), and the same
# two against a second Tollgate whose plan has every limit (four rates, concurrency, body cap,
# period allowances) set high enough never to refuse: the cost of checking them. Tollgate is
# also loaded over HTTPS (its rustls listener, a self-signed certificate made here; wrk does not
# verify it), one key, beside the bare Pingora over HTTPS (`pingora_https`: Pingora's own rustls
# listener, the same certificate). `features_*` is Tollgate with what the issues before #35 added
# switched on where a user would: two meters and three routes (a reported, a fixed-price and a
# free one; the load's `/` is metered by time, its route looked up), a plan with included time,
# and the loaded key one of two on its license.
#
# Latency at a fixed rate: after the saturated rounds, `examples/fixed_rate.rs` loads bare
# Pingora, `tollgate_1key` and `tollgate_<KEYS>keys` at half of Pingora's median saturated rate
# (CONNS connections, DURATION s, ROUNDS alternating rounds), latency counted from when each
# request was due (as wrk2 does). wrk's p99 under saturation is mostly queueing; this one is not.
# Everything listens on 127.0.0.1, every load has a fixed duration, and every process this
# script starts is stopped when it exits (by its own pid).
#
# Where PostgreSQL's server programs are installed (Debian's postgresql package; PG=0 skips it),
# a throwaway PostgreSQL server is started here (initdb into the work directory, loopback, its
# own port) and Tollgate on it is loaded as `postgres_1key` and `postgres_<KEYS>keys`: the same
# config with `backend = "postgres"` and as many keys, minted into it.
#
# With BASELINE=path/to/an/older/tollgate (a release binary of an earlier commit), that binary
# is loaded in the same rounds as `baseline_1key` and `baseline_<KEYS>keys`, on the same config
# and database as `tollgate_*`: a change's cost, before and after, side by side in one run.
#
# With VARIANT and/or VARIANT_APPEND, a second Tollgate on the same config and database, changed
# by them, is loaded in the same rounds as `variant_1key` and `variant_<KEYS>keys`: an option's
# cost side by side. VARIANT is `section|key = value` entries separated by `;` (each line put
# under its section, e.g. 'storage|access_log = "errors"'); VARIANT_APPEND is TOML put at the
# end of the config, whose last table is the `loadtest` plan (so its first lines are keys of that
# plan, e.g. 'included_minutes = 30', and [[meters]] or [[routes]] tables may follow).
#
# Settings (environment): DURATION (s, default 10; also each fixed-rate load's), ROUNDS (3), CONNS (32),
# THREADS_LIST ("1 2"), KEYS (10000), WARMUP (2 s), BASELINE (unset), PG (1), VARIANT and
# VARIANT_APPEND (unset).
set -euo pipefail

DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
THREADS_LIST=${THREADS_LIST:-"1 2"}
KEYS=${KEYS:-10000}
WARMUP=${WARMUP:-2}
BASELINE=${BASELINE:-}
PG=${PG:-1}
VARIANT=${VARIANT:-}
VARIANT_APPEND=${VARIANT_APPEND:-}

root=$(cd "$(dirname "$0")/.." && pwd)
bench=compare
work=$(mktemp -d /tmp/tollgate-compare.XXXXXX)
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

upstream_pid=""
pg_bin=""
as_pg=()
cleanup() {
    [ -n "$upstream_pid" ] && pids+=("$upstream_pid")
    stop_all
    stop_postgres
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

need=()
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || need+=(nginx)
command -v haproxy >/dev/null 2>&1 || [ -x /usr/sbin/haproxy ] || need+=(haproxy)
command -v wrk >/dev/null 2>&1 || need+=(wrk)
command -v curl >/dev/null 2>&1 || need+=(curl)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "compare: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi
export PATH="$PATH:/usr/sbin"

echo "compare: building release binaries" >&2
(cd "$root" && cargo build --release --quiet --bin tollgate --example passthrough --example mint_keys \
    --example fixed_rate)
bin="${CARGO_TARGET_DIR:-$root/target}/release"

# The upstream: nginx, one worker, a small body.
up_port=$(port)
start_app "$up_port"
upstream_pid=$app_pid
wait_http "http://127.0.0.1:$up_port/"

# A certificate for Tollgate's HTTPS listener.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
    -subj /CN=localhost -keyout "$work/tls.key" -out "$work/tls.pem" 2>/dev/null

# Keys: one database, minted once, used by every Tollgate run.
db="$work/tollgate.db"
"$bin/examples/mint_keys" "$db" "$KEYS" 100000 "$work/keys.txt" loadtest
key1=$(head -1 "$work/keys.txt")
echo "$key1" >"$work/key1.txt"
rotate_keys "$work/keys.txt" "$work/rotate.lua"

# PostgreSQL: a server of this run's own, on loopback, as the unprivileged `postgres` user
# when run as root (PostgreSQL refuses root), with as many keys minted into it.
pg_url=""
if [ "$PG" = 1 ]; then
    pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1 || true)
fi
if [ -n "$pg_bin" ]; then
    start_postgres
    "$bin/examples/mint_keys" "$pg_url" "$KEYS" 100000 "$work/pgkeys.txt" loadtest
    pg_key1=$(head -1 "$work/pgkeys.txt")
    rotate_keys "$work/pgkeys.txt" "$work/rotate_pg.lua"
else
    echo "compare: no PostgreSQL server programs (or PG=0): no postgres_* rows" >&2
fi

mkdir -p "$work/out"
for threads in $THREADS_LIST; do
    echo "compare: $threads thread(s)/worker(s) per proxy" >&2
    ng_port=$(port); ha_port=$(port); pg_port=$(port); tg_port=$(port)
    tg_admin=$(port); tg_metrics=$(port)
    tl_port=$(port); tl_admin=$(port); tl_metrics=$(port); tls_port=$(port); pgtls_port=$(port)
    ft_port=$(port); ft_admin=$(port); ft_metrics=$(port)
    bl_port=$(port); bl_admin=$(port); bl_metrics=$(port)
    va_port=$(port); va_admin=$(port); va_metrics=$(port)
    pq_port=$(port); pq_admin=$(port); pq_metrics=$(port)

    mkdir -p "$work/ng$threads"
    cat >"$work/ng$threads/nginx.conf" <<EOF
worker_processes $threads;
daemon off;
pid $work/ng$threads/nginx.pid;
error_log $work/ng$threads/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    upstream app { server 127.0.0.1:$up_port; keepalive 128; }
    server {
        listen 127.0.0.1:$ng_port reuseport;
        location / {
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    nginx -p "$work/ng$threads" -c "$work/ng$threads/nginx.conf" &
    pids+=($!)

    cat >"$work/haproxy$threads.cfg" <<EOF
global
    nbthread $threads
    maxconn 4096
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    http-reuse always
frontend fe
    bind 127.0.0.1:$ha_port
    default_backend app
backend app
    server app 127.0.0.1:$up_port
EOF
    haproxy -f "$work/haproxy$threads.cfg" -db -q &
    pids+=($!)

    "$bin/examples/passthrough" "127.0.0.1:$pg_port" "127.0.0.1:$up_port" "$threads" \
        "127.0.0.1:$pgtls_port" "$work/tls.pem" "$work/tls.key" \
        >"$work/passthrough$threads.log" 2>&1 &
    pids+=($!)

    cat >"$work/tollgate$threads.toml" <<EOF
[proxy]
listen = "127.0.0.1:$tg_port"
tls_listen = "127.0.0.1:$tls_port"
tls_cert = "$work/tls.pem"
tls_key = "$work/tls.key"
upstream = "127.0.0.1:$up_port"
threads = $threads
grace_period_s = 1
[admin]
listen = "127.0.0.1:$tg_admin"
[metrics]
listen = "127.0.0.1:$tg_metrics"
[storage]
path = "$db"
log_queue_capacity = 1000000
[[plans]]
name = "free"
[[plans]]
name = "loadtest"
EOF
    RUST_LOG=warn "$bin/tollgate" serve --config "$work/tollgate$threads.toml" \
        >"$work/tollgate$threads.log" 2>&1 &
    pids+=($!)

    # The same, with every limit of the plan checked on every request.
    sed -e "s/127.0.0.1:$tg_port/127.0.0.1:$tl_port/" -e "s/127.0.0.1:$tg_admin/127.0.0.1:$tl_admin/" \
        -e "s/127.0.0.1:$tg_metrics/127.0.0.1:$tl_metrics/" -e '/^tls_/d' "$work/tollgate$threads.toml" \
        | sed '/^name = "loadtest"$/,$d' >"$work/limits$threads.toml"
    cat >>"$work/limits$threads.toml" <<EOF
name = "loadtest"
requests_per_second = 1000000000
requests_per_minute = 60000000000
requests_per_hour = 3600000000000
requests_per_day = 86400000000000
max_concurrent = 100000
max_body_bytes = 1073741824
period_hours = 1000000
period_requests = 1000000000000000
EOF
    RUST_LOG=warn "$bin/tollgate" serve --config "$work/limits$threads.toml" \
        >"$work/limits$threads.log" 2>&1 &
    pids+=($!)

    # The same, with meters, routes, a plan with included time, and a second key on the
    # loaded key's license (added once: the database is shared by every run).
    sed -e "s/127.0.0.1:$tg_port/127.0.0.1:$ft_port/" -e "s/127.0.0.1:$tg_admin/127.0.0.1:$ft_admin/" \
        -e "s/127.0.0.1:$tg_metrics/127.0.0.1:$ft_metrics/" -e '/^tls_/d' "$work/tollgate$threads.toml" \
        | sed '/^\[\[plans\]\]$/,$d' >"$work/features$threads.toml"
    cat >>"$work/features$threads.toml" <<EOF
[[plans]]
name = "free"
[[plans]]
name = "loadtest"
included_minutes = 600
requests_per_second = 1000000000
[[meters]]
name = "audio_seconds"
price_ms = 1000
max_per_request = 3600
[[meters]]
name = "files"
max_per_request = 10
[[routes]]
path = "/transcribe"
methods = ["POST"]
charge = "reported"
meters = ["audio_seconds", "files"]
reserve = { audio_seconds = 600, files = 1 }
[[routes]]
path = "/thumbnails/*"
charge = "fixed"
price_ms = 500
[[routes]]
path = "/health"
charge = "free"
EOF
    "$bin/tollgate" check-config --config "$work/features$threads.toml" >&2
    if [ ! -e "$work/ft_key1.txt" ]; then
        # license 2 gets a second key, which features_1key loads (tollgate_1key loads license
        # 1's only key); features_<KEYS>keys rotates all the keys, license 2's first among them
        "$bin/tollgate" keys add --json --config "$work/features$threads.toml" 2 \
            | python3 -c 'import json, sys; print(json.load(sys.stdin)["license_key"])' \
            >"$work/ft_key1.txt"
    fi
    ft_key1=$(cat "$work/ft_key1.txt")
    RUST_LOG=warn "$bin/tollgate" serve --config "$work/features$threads.toml" \
        >"$work/features$threads.log" 2>&1 &
    pids+=($!)

    if [ -n "$pg_url" ]; then
        # the same gateway with its data in PostgreSQL, its own ports, plain HTTP
        sed -e "s/127.0.0.1:$tg_port/127.0.0.1:$pq_port/" -e "s/127.0.0.1:$tg_admin/127.0.0.1:$pq_admin/" \
            -e "s/127.0.0.1:$tg_metrics/127.0.0.1:$pq_metrics/" -e '/^tls_/d' \
            -e 's/^path = .*/backend = "postgres"/' \
            "$work/tollgate$threads.toml" >"$work/postgres$threads.toml"
        TOLLGATE_DATABASE_URL="$pg_url" RUST_LOG=warn "$bin/tollgate" serve \
            --config "$work/postgres$threads.toml" >"$work/postgres$threads.log" 2>&1 &
        pids+=($!)
    fi

    if [ -n "$BASELINE" ]; then
        # the older binary on the same config, its own ports, plain HTTP
        sed -e "s/127.0.0.1:$tg_port/127.0.0.1:$bl_port/" -e "s/127.0.0.1:$tg_admin/127.0.0.1:$bl_admin/" \
            -e "s/127.0.0.1:$tg_metrics/127.0.0.1:$bl_metrics/" -e '/^tls_/d' \
            "$work/tollgate$threads.toml" >"$work/baseline$threads.toml"
        RUST_LOG=warn "$BASELINE" serve --config "$work/baseline$threads.toml" \
            >"$work/baseline$threads.log" 2>&1 &
        pids+=($!)
    fi

    if [ -n "$VARIANT$VARIANT_APPEND" ]; then
        # the same binary and database, the config changed by VARIANT and VARIANT_APPEND
        sed -e "s/127.0.0.1:$tg_port/127.0.0.1:$va_port/" -e "s/127.0.0.1:$tg_admin/127.0.0.1:$va_admin/" \
            -e "s/127.0.0.1:$tg_metrics/127.0.0.1:$va_metrics/" -e '/^tls_/d' \
            "$work/tollgate$threads.toml" >"$work/variant$threads.toml"
        IFS=';' read -ra entries <<<"$VARIANT"
        for entry in "${entries[@]}"; do
            [ -n "$entry" ] || continue
            section=${entry%%|*}
            line=${entry#*|}
            if grep -q "^\[$section\]\$" "$work/variant$threads.toml"; then
                awk -v s="[$section]" -v l="$line" '{ print } $0 == s { print l }' \
                    "$work/variant$threads.toml" >"$work/variant$threads.tmp"
                mv "$work/variant$threads.tmp" "$work/variant$threads.toml"
            else
                printf '[%s]\n%s\n' "$section" "$line" >"$work/variant$threads.tmp"
                cat "$work/variant$threads.toml" >>"$work/variant$threads.tmp"
                mv "$work/variant$threads.tmp" "$work/variant$threads.toml"
            fi
        done
        [ -n "$VARIANT_APPEND" ] && printf '%s\n' "$VARIANT_APPEND" >>"$work/variant$threads.toml"
        "$bin/tollgate" check-config --config "$work/variant$threads.toml" >&2
        RUST_LOG=warn "$bin/tollgate" serve --config "$work/variant$threads.toml" \
            >"$work/variant$threads.log" 2>&1 &
        pids+=($!)
    fi

    wait_http "http://127.0.0.1:$ng_port/"
    wait_http "http://127.0.0.1:$ha_port/"
    wait_http "http://127.0.0.1:$pg_port/"
    for _ in $(seq 1 200); do # (wait_http does not take a self-signed certificate)
        curl -sk -o /dev/null -m 1 "https://127.0.0.1:$pgtls_port/" && break
        sleep 0.05
    done
    wait_http "http://127.0.0.1:$tg_port/" "X-License-Key: $key1"
    wait_http "http://127.0.0.1:$tl_port/" "X-License-Key: $key1"
    wait_http "http://127.0.0.1:$ft_port/" "X-License-Key: $ft_key1"

    targets=(
        "direct|http://127.0.0.1:$up_port/|header"
        "nginx|http://127.0.0.1:$ng_port/|header"
        "haproxy|http://127.0.0.1:$ha_port/|header"
        "pingora|http://127.0.0.1:$pg_port/|header"
        "pingora_https|https://127.0.0.1:$pgtls_port/|header"
        "tollgate_1key|http://127.0.0.1:$tg_port/|header"
        "tollgate_${KEYS}keys|http://127.0.0.1:$tg_port/|lua"
        "tollgate_https_1key|https://127.0.0.1:$tls_port/|header"
        "limits_1key|http://127.0.0.1:$tl_port/|header"
        "limits_${KEYS}keys|http://127.0.0.1:$tl_port/|lua"
        "features_1key|http://127.0.0.1:$ft_port/|ftheader"
        "features_${KEYS}keys|http://127.0.0.1:$ft_port/|lua"
    )
    if [ -n "$pg_url" ]; then
        wait_http "http://127.0.0.1:$pq_port/" "X-License-Key: $pg_key1"
        targets+=(
            "postgres_1key|http://127.0.0.1:$pq_port/|pgheader"
            "postgres_${KEYS}keys|http://127.0.0.1:$pq_port/|pglua"
        )
    fi
    if [ -n "$BASELINE" ]; then
        wait_http "http://127.0.0.1:$bl_port/" "X-License-Key: $key1"
        targets+=(
            "baseline_1key|http://127.0.0.1:$bl_port/|header"
            "baseline_${KEYS}keys|http://127.0.0.1:$bl_port/|lua"
        )
    fi
    if [ -n "$VARIANT$VARIANT_APPEND" ]; then
        wait_http "http://127.0.0.1:$va_port/" "X-License-Key: $key1"
        targets+=(
            "variant_1key|http://127.0.0.1:$va_port/|header"
            "variant_${KEYS}keys|http://127.0.0.1:$va_port/|lua"
        )
    fi
    run_wrk() { # name url mode seconds outfile
        # Every target gets the same request, key header included: the proxies all parse it.
        local extra=(-H "X-License-Key: $key1")
        [ "$3" = lua ] && extra=(-s "$work/rotate.lua")
        [ "$3" = pgheader ] && extra=(-H "X-License-Key: $pg_key1")
        [ "$3" = ftheader ] && extra=(-H "X-License-Key: $ft_key1")
        [ "$3" = pglua ] && extra=(-s "$work/rotate_pg.lua")
        wrk -t1 -c"$CONNS" -d"$4"s --latency "${extra[@]}" "$2" >"$5" 2>&1
    }
    for t in "${targets[@]}"; do
        IFS='|' read -r name url mode <<<"$t"
        run_wrk "$name" "$url" "$mode" "$WARMUP" /dev/null
    done
    for round in $(seq 1 "$ROUNDS"); do
        for t in "${targets[@]}"; do
            IFS='|' read -r name url mode <<<"$t"
            echo "compare:   round $round/$ROUNDS $name" >&2
            if [ "$mode" = pglua ]; then
                # a node gives back the leases of keys idle longer than the lease lifetime, as
                # each is between its rounds: without this it would meet every key cold again
                # (that is measured on its own below) and take ~10 s to be warm
                run_wrk "$name" "$url" "$mode" 10 /dev/null
            fi
            run_wrk "$name" "$url" "$mode" "$DURATION" "$work/out/$threads.$name.$round.txt"
        done
    done
    # latency at half of bare Pingora's median saturated rate, the targets alternating
    rate=$(python3 -c 'import re, statistics, sys
print(int(statistics.median(float(re.search(r"Requests/sec:\s+([\d.]+)", open(p).read()).group(1))
                            for p in sys.argv[1:]) / 2))' "$work/out/$threads.pingora."*.txt)
    mkdir -p "$work/lat"
    for round in $(seq 1 "$ROUNDS"); do
        # (bare Pingora gets the one key's header too, as in the saturated rounds)
        for t in "pingora|$pg_port|$work/key1.txt" "tollgate_1key|$tg_port|$work/key1.txt" \
            "tollgate_${KEYS}keys|$tg_port|$work/keys.txt"; do
            IFS='|' read -r name p keys <<<"$t"
            echo "compare:   fixed rate $rate/s, round $round/$ROUNDS $name" >&2
            "$bin/examples/fixed_rate" "127.0.0.1:$p" "$rate" "$DURATION" "$CONNS" "$keys" \
                >"$work/lat/$threads.$name.$round.txt" ||
                echo "compare:   fixed_rate failed on $name (its round is left out)" >&2
        done
    done
    if [ -n "$pg_url" ]; then
        # a node meeting every key for the first time: a new process on the same database
        # (its cache empty) loaded with the keys in turn for its first second, and again once
        # warm; ROUNDS fresh nodes, each stopped after
        mkdir -p "$work/cold"
        for round in $(seq 1 "$ROUNDS"); do
            cd_port=$(port)
            sed -e "s/127.0.0.1:$pq_port/127.0.0.1:$cd_port/" \
                -e "s/127.0.0.1:$pq_admin/127.0.0.1:$(port)/" \
                -e "s/127.0.0.1:$pq_metrics/127.0.0.1:$(port)/" \
                "$work/postgres$threads.toml" >"$work/cold$threads.toml"
            TOLLGATE_DATABASE_URL="$pg_url" RUST_LOG=warn "$bin/tollgate" serve \
                --config "$work/cold$threads.toml" >"$work/cold$threads.$round.log" 2>&1 &
            cold_pid=$!
            pids+=("$cold_pid")
            # up when it answers anything (a keyless request: 401, no key met)
            if wait_http "http://127.0.0.1:$cd_port/"; then
                echo "compare:   postgres cold node, round $round/$ROUNDS" >&2
                {
                    wrk -t1 -c"$CONNS" -d1s -s "$work/rotate_pg.lua" "http://127.0.0.1:$cd_port/"
                    # (~10 s to meet 10,000 keys alone on this machine: 15 s, then a second)
                    wrk -t1 -c"$CONNS" -d15s -s "$work/rotate_pg.lua" \
                        "http://127.0.0.1:$cd_port/" >/dev/null
                    wrk -t1 -c"$CONNS" -d1s -s "$work/rotate_pg.lua" "http://127.0.0.1:$cd_port/"
                } >"$work/cold/$threads.$round.txt" 2>&1 ||
                    echo "compare:   the cold node's load failed (its round is left out)" >&2
            fi
            kill -TERM "$cold_pid" 2>/dev/null || true
            wait "$cold_pid" 2>/dev/null || true
            kept=()
            for q in "${pids[@]}"; do [ "$q" = "$cold_pid" ] || kept+=("$q"); done
            pids=("${kept[@]}")
        done
    fi
    stop_all
done
pids=("$upstream_pid")
upstream_pid=""

python3 - "$work/out" "$root/benches/RESULTS.md" "$CONNS" "$DURATION" "$ROUNDS" "$KEYS" \
    "$VARIANT" "$VARIANT_APPEND" "$work/lat" "$work/cold" <<'EOF'
import glob, os, re, statistics, subprocess, sys, datetime

out, results, conns, duration, rounds, keys, variant, variant_append, lat, cold = sys.argv[1:11]
unit = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}

def parse(path):
    text = open(path).read()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    lat = {}
    for pct, val, u in re.findall(r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$", text, re.M):
        lat[pct] = float(val) * unit[u]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    sock = re.search(r"Socket errors: (.*)", text)
    return rps, lat.get("50"), lat.get("99"), int(errors.group(1)) if errors else 0, sock

runs = {}
for path in glob.glob(os.path.join(out, "*.txt")):
    threads, name, _round, _ = os.path.basename(path).split(".")
    runs.setdefault((int(threads), name), {})[int(_round)] = parse(path)

order = ["direct", "nginx", "haproxy", "pingora", "pingora_https", "baseline_1key", f"baseline_{keys}keys",
         "tollgate_1key", f"tollgate_{keys}keys", "tollgate_https_1key", "limits_1key",
         f"limits_{keys}keys", "features_1key", f"features_{keys}keys", "postgres_1key", f"postgres_{keys}keys", "variant_1key",
         f"variant_{keys}keys"]
rows = []
for threads in sorted({t for t, _ in runs}):
    med = {}
    for name in order:
        r = list(runs.get((threads, name), {}).values())
        if not r:
            continue
        med[name] = (
            statistics.median(x[0] for x in r),
            statistics.median(x[1] for x in r),
            statistics.median(x[2] for x in r),
            sum(x[3] for x in r),
        )
    for name in order:
        if name not in med:
            continue
        rps, p50, p99, bad = med[name]
        vs_pg = rps / med["pingora"][0] if "pingora" in med else float("nan")
        vs_ng = rps / med["nginx"][0] if "nginx" in med else float("nan")
        dp99 = p99 - med["pingora"][2] if "pingora" in med else float("nan")
        rows.append((threads, name, rps, p50, p99, vs_pg, vs_ng, dp99, bad))

def ver(cmd):
    try:
        r = subprocess.run(cmd, capture_output=True, text=True)
        return (r.stdout + r.stderr).strip().splitlines()[0]
    except Exception:
        return "?"

cpu = "?"
for line in open("/proc/cpuinfo"):
    if line.startswith("model name"):
        cpu = line.split(":", 1)[1].strip()
        break
table = [
    f"Run {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC on `nproc` = {os.cpu_count()} "
    f"({cpu}); wrk 1 thread, {conns} connections, {duration} s per load, {rounds} alternating "
    f"rounds, medians shown. {ver(['nginx', '-v'])}; {ver(['haproxy', '-v'])}; Pingora 0.9 "
    f"passthrough = examples/passthrough.rs. The load generator, the upstream and the proxy "
    f"share the same cores.",
    "",
    "| threads | target | req/s | p50 µs | p99 µs | vs Pingora | vs nginx | p99 − Pingora µs | non-2xx |",
    "|---:|---|---:|---:|---:|---:|---:|---:|---:|",
]
for t, name, rps, p50, p99, vp, vn, dp, bad in rows:
    table.append(
        f"| {t} | {name} | {rps:,.0f} | {p50:,.0f} | {p99:,.0f} | {vp:.2f}x | {vn:.2f}x | {dp:+,.0f} | {bad} |"
    )
all_threads = sorted({t for t, _ in runs})

def median_row(threads, name):
    found = [r for t, n, *r in rows if t == threads and n == name]
    return found[0] if found else None

def pairs(title, couples, p99=False):
    """Ratios of req/s (`a` against `b`, each thread count), under `title`: the median of the
    rounds' own ratios (the two loaded minutes apart at most, pair by pair), and their range."""
    lines = []
    for threads in all_threads:
        for a, b in couples:
            ra, rb = runs.get((threads, a), {}), runs.get((threads, b), {})
            each = sorted(ra[r][0] / rb[r][0] for r in ra.keys() & rb.keys() if rb[r][0] > 0)
            if each:
                ma, mb = median_row(threads, a), median_row(threads, b)
                lines.append(
                    f"- {threads} thread(s), `{a}` against `{b}`: {statistics.median(each):.3f}x "
                    f"the req/s (rounds {each[0]:.3f}x to {each[-1]:.3f}x)"
                    + (f", p99 {ma[2]:,.0f} µs against {mb[2]:,.0f}" if p99 else "")
                )
    if lines:
        table.extend(["", title, ""] + lines)

tg1, tgn = "tollgate_1key", f"tollgate_{keys}keys"
pairs("Against bare Pingora (the issue's targets: ≥ 0.95x with one key, ≥ 0.90x with "
      f"{keys} keys, ≥ 0.95x over HTTPS):",
      [(tg1, "pingora"), (tgn, "pingora"), ("tollgate_https_1key", "pingora_https")])
pairs("HTTPS against plain HTTP (keep-alive connections: the handshake is paid once per "
      "connection):", [("tollgate_https_1key", tg1), ("pingora_https", "pingora")])
pairs("Plan limits checked on every request:",
      [("limits_1key", tg1), (f"limits_{keys}keys", tgn)])
pairs("Every feature a user would switch on (`features_*`: meters, routes, a plan with "
      "included time, two keys on the license):",
      [("features_1key", tg1), (f"features_{keys}keys", tgn), ("features_1key", "pingora"),
       (f"features_{keys}keys", "pingora")])
pairs("The store in PostgreSQL (`postgres_*`, a local server sharing the cores) against "
      "SQLite:", [("postgres_1key", tg1), (f"postgres_{keys}keys", tgn)], p99=True)
pairs("This change against the BASELINE binary:",
      [(tg1, "baseline_1key"), (tgn, f"baseline_{keys}keys")], p99=True)
what = "; ".join(x for x in (variant, variant_append.replace("\n", " ")) if x)
pairs(f"The variant (`variant_*`: {what}):",
      [("variant_1key", tg1), (f"variant_{keys}keys", tgn)], p99=True)

# latency at a fixed rate: "requests non_2xx rate p50 p90 p99 p999 max" (µs) per file
fixed = {}
for path in glob.glob(os.path.join(lat, "*.txt")):
    threads, name, _round, _ = os.path.basename(path).split(".")
    fields = open(path).read().split()
    if len(fields) == 8:
        fixed.setdefault((int(threads), name), []).append([float(x) for x in fields])
if fixed:
    table += ["", "Latency at a fixed rate, half of bare Pingora's median saturated req/s "
              "(`examples/fixed_rate.rs`, latency from when each request was due; medians of "
              f"the {rounds} rounds; the issue's target: p99 within 300 µs of Pingora's):", "",
              "| threads | target | rate | p50 µs | p90 µs | p99 µs | p99.9 µs | p99 − Pingora µs | non-2xx |",
              "|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for threads in sorted({t for t, _ in fixed}):
        med = {n: [statistics.median(col) for col in zip(*r)] for (t, n), r in fixed.items()
               if t == threads}
        base = med.get("pingora")
        for name in ("pingora", tg1, tgn):
            if name not in med:
                continue
            req, bad, rate, p50, p90, p99, p999, _ = med[name]
            bad = sum(r[1] for r in fixed[(threads, name)])
            d = f"{p99 - base[5]:+,.0f}" if base else "?"
            table.append(f"| {threads} | {name} | {rate:,.0f} | {p50:,.0f} | {p90:,.0f} | "
                         f"{p99:,.0f} | {p999:,.0f} | {d} | {bad:.0f} |")
# a cold node on PostgreSQL: its first second's req/s against its warm second's
colds = {}
for path in glob.glob(os.path.join(cold, "*.txt")):
    threads = int(os.path.basename(path).split(".")[0])
    text = open(path).read()
    rates = [float(x) for x in re.findall(r"Requests/sec:\s+([\d.]+)", text)]
    bad = sum(int(x) for x in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    if len(rates) == 2 and rates[1] > 0:
        colds.setdefault(threads, []).append((rates[0], rates[1], bad))
if colds:
    table += ["", f"A node on PostgreSQL meeting the {keys} keys for the first time (a new process "
              "beside the warm one, the keys in turn): its first second, its second after 15 s "
              f"more of load, and the first second against the warm `postgres_{keys}keys` of "
              "the same run (the issue's target: ≥ 0.5x of the warm rate from the first second):",
              ""]
    for threads, r in sorted(colds.items()):
        warm = median_row(threads, f"postgres_{keys}keys")
        parts = ", ".join(f"{a:,.0f} → {b:,.0f}" + (f" ({a / warm[0]:.2f}x of warm)" if warm and warm[0] > 0 else "")
                          for a, b, _ in r)
        table.append(f"- {threads} thread(s), each round: {parts}; non-2xx: {sum(x[2] for x in r)}")

text = "\n".join(table)
print(text)

begin, end = "<!-- compare:begin -->", "<!-- compare:end -->"
old = open(results).read() if os.path.exists(results) else ""
block = f"{begin}\n{text}\n{end}"
if begin in old and end in old:
    new = old[: old.index(begin)] + block + old[old.index(end) + len(end):]
else:
    new = (old.rstrip() + "\n\n" if old.strip() else "# Benchmark results\n\n") + "## Side by side (benches/compare.sh)\n\n" + block + "\n"
open(results, "w").write(new)
print(f"\nwritten to {results}", file=sys.stderr)
EOF
