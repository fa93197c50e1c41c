#!/usr/bin/env bash
# Fuzz the tar ingest (hostile layers merged into one tree, then written as an EROFS index) for a
# number of seconds (default 300):  fuzz/run.sh [SECONDS]
#
# Uses cargo-fuzz (libFuzzer) on the stable toolchain through RUSTC_BOOTSTRAP=1, with AddressSanitizer.
# Seeds: the tar layers of tests/fuzz_tar_smoke.rs (written there when WISP_TAR_SEEDS names a
# directory). Crashes land in fuzz/artifacts/tar_ingest/ and make this script fail.
set -euo pipefail
secs="${1:-300}"
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here"
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "cargo-fuzz missing: cargo install cargo-fuzz" >&2
    exit 2
fi
mkdir -p corpus/tar_ingest seeds
WISP_TAR_SEEDS="$here/seeds" CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$here/../target}" \
    cargo test -q --release --manifest-path "$here/../Cargo.toml" --test fuzz_tar_smoke >/dev/null
export RUSTC_BOOTSTRAP=1
exec cargo fuzz run tar_ingest corpus/tar_ingest seeds -- \
    -max_total_time="$secs" -max_len=262144 -rss_limit_mb=2048 -timeout=10 -print_final_stats=1
