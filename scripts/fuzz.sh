#!/usr/bin/env bash
# Runs each cargo-fuzz target for a bounded time: ./scripts/fuzz.sh [SECONDS_PER_TARGET]
set -euo pipefail
cd "$(dirname "$0")/.."
seconds="${1:-60}"
if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz: needs the nightly toolchain: rustup toolchain install nightly" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi
for target in key_extraction stripe_signature config_parser webhook_event; do
    mkdir -p "fuzz/corpus/$target"
    dict=()
    [ -f "fuzz/dicts/$target.dict" ] && dict=(-dict="fuzz/dicts/$target.dict")
    echo "fuzz: $target for ${seconds}s"
    cargo +nightly fuzz run "$target" "fuzz/corpus/$target" "fuzz/seeds/$target" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
        ${dict[@]+"${dict[@]}"}
done
