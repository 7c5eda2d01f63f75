# Helpers the bench scripts share (sourced, not run): free loopback ports, waiting for a
# server to answer, nginx as the app, a throwaway PostgreSQL server. The caller sets `bench`
# (its name, for messages) and `work` (its work directory), and stops what these start.

# A free port on 127.0.0.1.
port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# Waits up to 10 s for `url` to answer (with `header`, if given).
wait_http() { # url [header]
    for _ in $(seq 1 200); do
        if curl -s -o /dev/null -m 1 ${2:+-H "$2"} "$1"; then return 0; fi
        sleep 0.05
    done
    echo "$bench: $1 did not answer" >&2
    tail -n 5 "$work"/*.log >&2 2>/dev/null || true
    return 1
}

# The app: nginx, one worker, answering 200 with a small body on `port`, its files in
# `$work/up`; sets `app_pid` (the caller adds it to what it stops, then waits for it).
start_app() { # port
    mkdir -p "$work/up"
    cat >"$work/up/nginx.conf" <<NGINX
worker_processes 1;
daemon off;
pid $work/up/nginx.pid;
error_log $work/up/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    server {
        listen 127.0.0.1:$1 reuseport;
        location / { default_type text/plain; return 200 "hello from upstream\n"; }
    }
}
NGINX
    nginx -p "$work/up" -c "$work/up/nginx.conf" &
    app_pid=$!
}

# A throwaway PostgreSQL server of `pg_bin` in `$work/pg` (as the `postgres` user when run as
# root), on a free loopback port, with a database `tollgate`; sets `pg_user`, `as_pg`,
# `db_port` and `pg_url`. `stop_postgres` stops it.
start_postgres() {
    mkdir -p "$work/pg"
    pg_user=$(id -un)
    as_pg=()
    if [ "$(id -u)" = 0 ]; then
        pg_user=postgres
        chown postgres "$work/pg"
        chmod 755 "$work"
        as_pg=(runuser -u postgres --)
    fi
    db_port=$(port)
    "${as_pg[@]}" "$pg_bin/initdb" -D "$work/pg/data" -A trust -U "$pg_user" >/dev/null
    "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -l "$work/pg/server.log" -w \
        -o "-p $db_port -k $work/pg -c listen_addresses=127.0.0.1" start >/dev/null
    "${as_pg[@]}" "$pg_bin/createdb" -h 127.0.0.1 -p "$db_port" -U "$pg_user" tollgate
    pg_url="postgres://$pg_user@127.0.0.1:$db_port/tollgate"
}

stop_postgres() {
    if [ -n "${pg_bin:-}" ] && [ -f "$work/pg/data/postmaster.pid" ]; then
        "${as_pg[@]}" "$pg_bin/pg_ctl" -D "$work/pg/data" -m fast -w stop >/dev/null 2>&1 || true
    fi
}

# Stops every process in `pids` (TERM, then KILL after 5 s), and empties it.
stop_all() {
    local p
    for p in "${pids[@]}"; do
        kill -TERM "$p" 2>/dev/null || true
    done
    for p in "${pids[@]}"; do
        for _ in $(seq 1 50); do
            kill -0 "$p" 2>/dev/null || break
            sleep 0.1
        done
        kill -KILL "$p" 2>/dev/null || true
    done
    pids=()
}

# A wrk Lua script sending each request with the next key of `keys-file` (one per line).
rotate_keys() { # keys-file lua-file
    cat >"$2" <<EOF
local keys = {}
for line in io.lines("$1") do keys[#keys + 1] = line end
local i = 0
request = function()
    i = i + 1
    return wrk.format("GET", "/", { ["X-License-Key"] = keys[(i % #keys) + 1] })
end
EOF
}
