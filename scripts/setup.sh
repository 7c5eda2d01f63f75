#!/usr/bin/env bash
# Installs what building and testing Tollgate needs on a fresh Debian/Ubuntu machine, when it is
# missing: a C toolchain, cmake and pkg-config (Pingora's build), Prometheus (the metrics test
# scrapes the gateway with a real one), Chromium (the console tests drive a headless one),
# PostgreSQL (the PostgreSQL tests start throwaway servers of their own), HAProxy (in front of
# the cluster tests' nodes), libfaketime (a node whose clock is off), a JDK and embedded Tomcat
# (a real servlet container behind the free-path tests), Schemathesis and
# openapi-spec-validator in a virtualenv (the OpenAPI test), and a Rust toolchain check.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v curl >/dev/null 2>&1 || need+=(curl)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
# PostgreSQL's server programs (initdb, pg_ctl): the PostgreSQL tests start a server of their own
{ command -v pg_ctl || ls /usr/lib/postgresql/*/bin/pg_ctl; } >/dev/null 2>&1 || need+=(postgresql)
# HAProxy: the cluster tests put one in front of three nodes
{ command -v haproxy || [ -x /usr/sbin/haproxy ]; } >/dev/null 2>&1 || need+=(haproxy)
# libfaketime: the cluster tests run a node whose clock is off
ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || need+=(faketime)
# a JDK and embedded Tomcat: the free-path tests put a real servlet container behind the gateway
command -v javac >/dev/null 2>&1 || need+=(default-jdk-headless)
[ -f /usr/share/java/tomcat10-embed-core.jar ] || need+=(libtomcat10-embed-java)
[ -f /usr/share/java/jakarta-annotation-api.jar ] || need+=(libjakarta-annotation-api-java)

if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

# The OpenAPI test's Python tools, pinned, in their own virtualenv (tests/openapi.rs looks for
# them there, or in $TOLLGATE_VENV).
venv="${TOLLGATE_VENV:-${HOME:?set HOME or TOLLGATE_VENV}/.cache/tollgate/venv}"
want_schemathesis="4.32.5"
want_validator="0.9.0"
if ! "$venv/bin/python" - "$want_schemathesis" "$want_validator" >/dev/null 2>&1 <<'PY'
import sys
from importlib.metadata import version
sys.exit(version("schemathesis") != sys.argv[1] or version("openapi-spec-validator") != sys.argv[2])
PY
then
    echo "setup: installing schemathesis $want_schemathesis and openapi-spec-validator $want_validator into $venv" >&2
    # --clear: a venv left from a python3 since removed or upgraded is made again
    python3 -m venv --clear "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check \
        "schemathesis==$want_schemathesis" "openapi-spec-validator==$want_validator"
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: no Rust toolchain found; install one with rustup (https://rustup.rs)" >&2
    exit 1
fi
