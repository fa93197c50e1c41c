#!/usr/bin/env bash
# Fuzz the EROFS reader for a number of seconds (default 300):  erofs/fuzz/run.sh [SECONDS]
#
# Uses cargo-fuzz (libFuzzer) on the stable toolchain through RUSTC_BOOTSTRAP=1, with AddressSanitizer.
# Seeds: images of the test trees, written by the golden test (WISP_EROFS_SEEDS). Crashes land in
# erofs/fuzz/artifacts/image/ and make this script fail.
set -euo pipefail
secs="${1:-300}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2
    exit 2
fi
mkdir -p corpus/image seeds
WISP_EROFS_SEEDS="$here/seeds" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/target}" \
    cargo test -q --manifest-path "$here/../Cargo.toml" --test golden >/dev/null
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run image corpus/image seeds -- \
    -max_total_time="$secs" -max_len=1048576 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
