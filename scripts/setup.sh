#!/usr/bin/env bash
# Installs what building and testing Tollgate needs on a fresh Debian/Ubuntu machine, when it is
# missing: a C toolchain, cmake and pkg-config (Pingora's build), Prometheus (the metrics test
# scrapes the gateway with a real one), Chromium (the console tests drive a headless one), and a
# Rust toolchain check.
set -euo pipefail

need=()
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v curl >/dev/null 2>&1 || need+=(curl)
{ command -v prometheus && command -v promtool; } >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium fonts-dejavu-core)

if ((${#need[@]})); then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    echo "setup: installing ${need[*]}" >&2
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
        "${need[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: no Rust toolchain found; install one with rustup (https://rustup.rs)" >&2
    exit 1
fi
