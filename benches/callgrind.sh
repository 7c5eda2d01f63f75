#!/usr/bin/env bash
#! `benches/callgrind.sh`: instructions per request, Tollgate beside a bare Pingora passthrough,
#! counted by callgrind over every thread of the process (the proxy's, the flusher's, SQLite's
#! writer's). Instructions do not depend on what else the machine runs, so one run is enough.
#
# Both binaries are built with `--profile profiling` (the release build with line tables, so
# `callgrind_annotate` can name functions). One upstream (nginx, lib.sh) serves both. Each
# target is started under `valgrind --tool=callgrind` and warmed up; an idle window as long as
# the loaded one is counted (`callgrind_control -z`, then `-d`), then the target is loaded with
# wrk for DURATION seconds and given two flush intervals to write what it served, and dumped:
# the loaded window's total less the idle one's, over the requests wrk counted, is the figure.
# Targets: `pingora`, `tollgate_1key`, `tollgate_<KEYS>keys` (a wrk Lua script rotating the
# keys), and with VARIANT and/or VARIANT_APPEND (as benches/compare.sh reads them: `section|key =
# value` entries separated by `;`, and TOML put at the end of the config, whose last table is
# the `loadtest` plan) `variant_1key` and `variant_<KEYS>keys`.
# Everything listens on 127.0.0.1 and every process this script starts is stopped when it exits.
#
# Allocations per request are counted from the same dumps: the calls into mimalloc's entry
# points (`mi_malloc_aligned`, `mi_zalloc_aligned`, `mi_realloc_aligned`: Rust's allocator, called
# through the `__rust_alloc` shims or, where the compiler inlined them, directly) and into libc's
# (`malloc`, `calloc`, `realloc` and their aligned kin: SQLite's), from outside mimalloc, the idle
# window's taken off as for instructions. A reallocation counts as one.
#
# Settings (environment): DURATION (s, default 10), CONNS (8), KEYS (10000), VARIANT and
# VARIANT_APPEND (unset),
# TOP (functions to list per target, default 0), PROFILE (the Cargo profile, default
# `profiling`; `release` counts the same instructions, without line tables), KEEP (a directory
# each target's loaded and idle dumps are copied to, for `callgrind_annotate --tree=caller`).
set -euo pipefail

DURATION=${DURATION:-10}
CONNS=${CONNS:-8}
KEYS=${KEYS:-10000}
VARIANT=${VARIANT:-}
VARIANT_APPEND=${VARIANT_APPEND:-}
TOP=${TOP:-0}
PROFILE=${PROFILE:-profiling}
KEEP=${KEEP:-}

root=$(cd "$(dirname "$0")/.." && pwd)
bench=callgrind
work=$(mktemp -d /tmp/tollgate-callgrind.XXXXXX)
pids=()
# shellcheck source=benches/lib.sh
. "$root/benches/lib.sh"

trap 'stop_all; rm -rf "$work"' EXIT

echo "callgrind: building the $PROFILE binaries" >&2
(cd "$root" && cargo build --profile "$PROFILE" --quiet --bin tollgate --example passthrough \
    --example mint_keys)
bin="${CARGO_TARGET_DIR:-$root/target}/$PROFILE"

up_port=$(port)
start_app "$up_port"
pids+=("$app_pid")
wait_http "http://127.0.0.1:$up_port/"

db="$work/tollgate.db"
"$bin/examples/mint_keys" "$db" "$KEYS" 100000 "$work/keys.txt" loadtest
key1=$(head -1 "$work/keys.txt")
rotate_keys "$work/keys.txt" "$work/rotate.lua"

config() { # name port -> writes $work/name.toml
    cat >"$work/$1.toml" <<EOF
[proxy]
listen = "127.0.0.1:$2"
upstream = "127.0.0.1:$up_port"
threads = 1
grace_period_s = 1
[admin]
listen = "127.0.0.1:$(port)"
[metrics]
listen = "127.0.0.1:$(port)"
[storage]
path = "$db"
log_queue_capacity = 1000000
[[plans]]
name = "free"
[[plans]]
name = "loadtest"
EOF
}

# Calls into the allocators in a callgrind dump (its `calls=` lines under a `cfn=` naming one).
allocations() { # dump
    python3 - "$1" <<'PY'
import re, sys
alloc = re.compile(r"^(mi_malloc_aligned|mi_zalloc_aligned|mi_realloc_aligned|(__libc_)?malloc|"
                   r"(__libc_)?calloc|(__libc_)?realloc|posix_memalign|aligned_alloc|memalign)$")
names, total, counted, caller = {}, 0, False, ""
with open(sys.argv[1], errors="replace") as f:
    for line in f:
        if line.startswith(("fn=", "cfn=")):
            m = re.match(r"c?fn=\((\d+)\)(?: (.*))?", line.rstrip("\n"))
            if m is None:  # a dump written without name compression
                name = line.rstrip("\n").split("=", 1)[1]
            else:
                if m.group(2):
                    names[m.group(1)] = m.group(2)
                name = names.get(m.group(1), "")
            if line.startswith("fn="):
                caller = name
            counted = (line.startswith("cfn=") and bool(alloc.search(name))
                       and not caller.startswith(("mi_", "_mi_")))
        elif line.startswith("calls=") and counted:
            total += int(line.split()[0][6:])
print(total)
PY
}

# One target: started under callgrind, warmed up, zeroed, loaded, dumped. Prints
# "name requests instructions idle-instructions allocations idle-allocations".
measure() { # name port mode command...
    local name=$1 p=$2 mode=$3
    shift 3
    valgrind --tool=callgrind --callgrind-out-file="$work/$name.out" "$@" \
        >"$work/$name.log" 2>&1 &
    local pid=$!
    pids+=("$pid")
    for _ in $(seq 1 600); do
        curl -s -o /dev/null -m 2 -H "X-License-Key: $key1" "http://127.0.0.1:$p/" && break
        sleep 0.2
    done
    local extra=(-H "X-License-Key: $key1")
    [ "$mode" = lua ] && extra=(-s "$work/rotate.lua")
    # warm up: every key seen once (the 10,000-key target's cache filled), connections made
    wrk -t1 -c"$CONNS" -d"$((KEYS > 1000 ? 15 : 3))"s "${extra[@]}" "http://127.0.0.1:$p/" \
        >/dev/null 2>&1
    sleep 3
    # the same window idle first: what the process spends with no request (timers, the
    # flusher's and the heartbeat's rounds), taken off the loaded window's count, since under
    # valgrind requests are ~50x fewer a second and that would weigh on each
    callgrind_control -z "$pid" >/dev/null 2>&1
    sleep "$((DURATION + 3))"
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    local idle_dump idle idle_allocs
    idle_dump=$(ls -t "$work/$name.out".* 2>/dev/null | head -1)
    idle=$(awk '/^summary:|^totals:/ { print $2; exit }' "$idle_dump")
    idle_allocs=$(allocations "$idle_dump")
    callgrind_control -z "$pid" >/dev/null 2>&1
    wrk -t1 -c"$CONNS" -d"$DURATION"s "${extra[@]}" "http://127.0.0.1:$p/" >"$work/$name.wrk" 2>&1
    # what it served, written: two flush intervals
    sleep 3
    callgrind_control -d "$pid" >/dev/null 2>&1
    sleep 1
    local requests dump total
    requests=$(awk '/requests in/ { print $1 }' "$work/$name.wrk")
    dump=$(ls -t "$work/$name.out".* 2>/dev/null | head -1)
    total=$(awk '/^summary:|^totals:/ { print $2; exit }' "$dump")
    echo "$name $requests $total $idle $(allocations "$dump") $idle_allocs"
    if [ -n "$KEEP" ]; then
        mkdir -p "$KEEP" && cp "$dump" "$KEEP/$name.out" && cp "$idle_dump" "$KEEP/$name.idle.out"
    fi
    if [ "$TOP" -gt 0 ]; then
        callgrind_annotate --inclusive=no --threshold=100 "$dump" 2>/dev/null \
            | awk -v top="$TOP" -v req="$requests" '
                /Ir/ && /file:function/ { on = 1; next }
                on && NF >= 2 && n < top { gsub(",", "", $1); printf "  %8.0f  %s\n", $1 / req, $0; n++ }
            ' | sed "s/^/  $name /" >&2
    fi
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
}

results=()
pg_port=$(port)
results+=("$(measure pingora "$pg_port" header \
    "$bin/examples/passthrough" "127.0.0.1:$pg_port" "127.0.0.1:$up_port" 1)")
tg_port=$(port)
config tollgate "$tg_port"
results+=("$(measure tollgate_1key "$tg_port" header \
    "$bin/tollgate" serve --config "$work/tollgate.toml")")
tg_port=$(port)
config tollgate "$tg_port"
results+=("$(measure "tollgate_${KEYS}keys" "$tg_port" lua \
    "$bin/tollgate" serve --config "$work/tollgate.toml")")
if [ -n "$VARIANT$VARIANT_APPEND" ]; then
    for mode in header lua; do
        va_port=$(port)
        config variant "$va_port"
        IFS=';' read -ra entries <<<"$VARIANT"
        for entry in "${entries[@]}"; do
            [ -n "$entry" ] || continue
            awk -v s="[${entry%%|*}]" -v l="${entry#*|}" '{ print } $0 == s { print l }' \
                "$work/variant.toml" >"$work/variant.tmp"
            mv "$work/variant.tmp" "$work/variant.toml"
        done
        [ -n "$VARIANT_APPEND" ] && printf '%s\n' "$VARIANT_APPEND" >>"$work/variant.toml"
        "$bin/tollgate" check-config --config "$work/variant.toml" >&2
        name=variant_1key
        [ "$mode" = lua ] && name="variant_${KEYS}keys"
        results+=("$(measure "$name" "$va_port" "$mode" \
            "$bin/tollgate" serve --config "$work/variant.toml")")
    done
fi

python3 - "$DURATION" "$CONNS" "$PROFILE" "$VARIANT $VARIANT_APPEND" "${results[@]}" <<'EOF'
import sys
duration, conns, profile, variant, *lines = sys.argv[1:]
variant = " ".join(variant.split())
rows = {}
for l in lines:
    name, *counts = l.split()
    rows[name] = tuple(map(int, counts))
per = {n: (ir - idle) / req for n, (req, ir, idle, _, _) in rows.items()}
allocs = {n: (a - idle_a) / req for n, (req, _, _, a, idle_a) in rows.items()}
base = per["pingora"]
print(f"callgrind, wrk 1 thread {conns} connections {duration} s per target, --profile {profile}, "
      f"the same window idle taken off" + (f"; variant: {variant}" if variant else ""))
print("")
print("| target | requests | instructions per request | idle window's, per request | vs bare Pingora | allocations per request |")
print("|---|---:|---:|---:|---:|---:|")
for name, (req, ir, idle, _, _) in rows.items():
    print(f"| {name} | {req:,} | {per[name] / 1000:.1f}k | {idle / req / 1000:.1f}k | {per[name] / base:.3f}x | {allocs[name]:.1f} |")
EOF
