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
# verify it), one key.
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
# Settings (environment): DURATION (s, default 10), ROUNDS (3), CONNS (32),
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
(cd "$root" && cargo build --release --quiet --bin tollgate --example passthrough --example mint_keys)
bin="$root/target/release"

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
    tl_port=$(port); tl_admin=$(port); tl_metrics=$(port); tls_port=$(port)
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
    wait_http "http://127.0.0.1:$tg_port/" "X-License-Key: $key1"
    wait_http "http://127.0.0.1:$tl_port/" "X-License-Key: $key1"

    targets=(
        "direct|http://127.0.0.1:$up_port/|header"
        "nginx|http://127.0.0.1:$ng_port/|header"
        "haproxy|http://127.0.0.1:$ha_port/|header"
        "pingora|http://127.0.0.1:$pg_port/|header"
        "tollgate_1key|http://127.0.0.1:$tg_port/|header"
        "tollgate_${KEYS}keys|http://127.0.0.1:$tg_port/|lua"
        "tollgate_https_1key|https://127.0.0.1:$tls_port/|header"
        "limits_1key|http://127.0.0.1:$tl_port/|header"
        "limits_${KEYS}keys|http://127.0.0.1:$tl_port/|lua"
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
            run_wrk "$name" "$url" "$mode" "$DURATION" "$work/out/$threads.$name.$round.txt"
        done
    done
    stop_all
done
pids=("$upstream_pid")
upstream_pid=""

python3 - "$work/out" "$root/benches/RESULTS.md" "$CONNS" "$DURATION" "$ROUNDS" "$KEYS" \
    "$VARIANT" "$VARIANT_APPEND" <<'EOF'
import glob, os, re, statistics, subprocess, sys, datetime

out, results, conns, duration, rounds, keys, variant, variant_append = sys.argv[1:9]
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
    runs.setdefault((int(threads), name), []).append(parse(path))

order = ["direct", "nginx", "haproxy", "pingora", "baseline_1key", f"baseline_{keys}keys",
         "tollgate_1key", f"tollgate_{keys}keys", "tollgate_https_1key", "limits_1key",
         f"limits_{keys}keys", "postgres_1key", f"postgres_{keys}keys", "variant_1key",
         f"variant_{keys}keys"]
rows = []
for threads in sorted({t for t, _ in runs}):
    med = {}
    for name in order:
        r = runs.get((threads, name))
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
table += ["", "HTTPS (`tollgate_https_1key`, keep-alive connections: the handshake is paid once per connection) against plain HTTP, same run:", ""]
for threads in sorted({t for t, _ in runs}):
    ra = [r for t, n, *r in rows if t == threads and n == "tollgate_https_1key"]
    rb = [r for t, n, *r in rows if t == threads and n == "tollgate_1key"]
    if ra and rb:
        table.append(f"- {threads} thread(s): {ra[0][0] / rb[0][0]:.3f}x the req/s")
table += ["", "Plan limits checked on every request (`limits_*` against `tollgate_*`, same run):", ""]
for threads in sorted({t for t, _ in runs}):
    for a, b in (("limits_1key", "tollgate_1key"), (f"limits_{keys}keys", f"tollgate_{keys}keys")):
        ra = [r for t, n, *r in rows if t == threads and n == a]
        rb = [r for t, n, *r in rows if t == threads and n == b]
        if ra and rb:
            table.append(f"- {threads} thread(s), {b.split('_', 1)[1]}: {ra[0][0] / rb[0][0]:.3f}x the req/s")
if any(n.startswith("postgres_") for _, n, *_ in rows):
    table += ["", "The store in PostgreSQL (`postgres_*`, a local server sharing the cores) against "
              "SQLite (`tollgate_*`), same run:", ""]
    for threads in sorted({t for t, _ in runs}):
        for a, b in (("postgres_1key", "tollgate_1key"), (f"postgres_{keys}keys", f"tollgate_{keys}keys")):
            ra = [r for t, n, *r in rows if t == threads and n == a]
            rb = [r for t, n, *r in rows if t == threads and n == b]
            if ra and rb:
                table.append(
                    f"- {threads} thread(s), {b.split('_', 1)[1]}: {ra[0][0]:,.0f} on PostgreSQL, "
                    f"{rb[0][0]:,.0f} on SQLite: {ra[0][0] / rb[0][0]:.3f}x the req/s, "
                    f"p99 {ra[0][2]:,.0f} µs against {rb[0][2]:,.0f}"
                )
if any(n.startswith("baseline_") for _, n, *_ in rows):
    table += ["", "This change (`tollgate_*`) against the BASELINE binary (`baseline_*`), same run:", ""]
    for threads in sorted({t for t, _ in runs}):
        for a, b in (("tollgate_1key", "baseline_1key"), (f"tollgate_{keys}keys", f"baseline_{keys}keys")):
            ra = [r for t, n, *r in rows if t == threads and n == a]
            rb = [r for t, n, *r in rows if t == threads and n == b]
            if ra and rb:
                table.append(
                    f"- {threads} thread(s), {b.split('_', 1)[1]}: {ra[0][0]:,.0f} after, "
                    f"{rb[0][0]:,.0f} before: {ra[0][0] / rb[0][0]:.3f}x the req/s, "
                    f"p99 {ra[0][2]:,.0f} µs after, {rb[0][2]:,.0f} before"
                )
if any(n.startswith("variant_") for _, n, *_ in rows):
    what = "; ".join(x for x in (variant, variant_append.replace("\n", " ")) if x)
    table += ["", f"The variant (`variant_*`: {what}) against `tollgate_*`, same run:", ""]
    for threads in sorted({t for t, _ in runs}):
        for a, b in (("variant_1key", "tollgate_1key"), (f"variant_{keys}keys", f"tollgate_{keys}keys")):
            ra = [r for t, n, *r in rows if t == threads and n == a]
            rb = [r for t, n, *r in rows if t == threads and n == b]
            if ra and rb:
                table.append(
                    f"- {threads} thread(s), {b.split('_', 1)[1]}: {ra[0][0] / rb[0][0]:.3f}x the req/s, "
                    f"p99 {ra[0][2]:,.0f} µs against {rb[0][2]:,.0f}"
                )
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
