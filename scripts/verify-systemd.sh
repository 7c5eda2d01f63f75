#!/usr/bin/env bash
# Checks systemd/tollgate.service with `systemd-analyze verify` (installing Debian's systemd
# package when the tool is missing). verify insists that the binaries a unit runs exist, so the
# unit is checked as a copy that points at the freshly built binary.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v systemd-analyze >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "verify-systemd: installing systemd" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends systemd >/dev/null
fi

bin="$PWD/target/debug/tollgate"
[ -x "$bin" ] || cargo build --locked --quiet --bin tollgate
dir=$(mktemp -d)
trap 'rm -rf "$dir"' EXIT
sed "s|/usr/local/bin/tollgate|$bin|g" systemd/tollgate.service > "$dir/tollgate.service"
# the user and the files it names exist only on a real install; verify checks the unit itself
out=$(systemd-analyze verify "$dir/tollgate.service" 2>&1) || {
    echo "$out" >&2
    exit 1
}
# verify reports some problems as warnings only: fail on anything it says about the unit
if echo "$out" | grep -i "tollgate.service" >&2; then
    exit 1
fi
echo "systemd-analyze verify: systemd/tollgate.service ok"
