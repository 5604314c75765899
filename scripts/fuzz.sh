#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for a bounded time (default 20 s each) and fails on the first
# crash. Builds the targets the way `cargo fuzz build -O --sanitizer none` does, with plain
# cargo on a stable toolchain, so CI needs neither cargo-fuzz nor nightly. Each target starts
# from a scratch copy of its committed corpus (seed-*), so a run adds nothing to the tree.
#
#   scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]
#
# Prints one line per target: the libFuzzer exec count and rate. A crash leaves its input in
# fuzz/artifacts/<target>/ (replay it with the target binary, then keep it as
# fuzz/corpus/<target>/seed-crash-<what> so `cargo test` replays it from then on).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
seconds=${1:-20}
shift || true
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
# cargo-fuzz's instrumentation flags (SanitizerCoverage for libFuzzer), without a sanitizer.
export RUSTFLAGS="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
started=$(date +%s)
# --target keeps build scripts and proc macros uninstrumented, as cargo-fuzz does.
cargo build --locked --release --bins --target "$triple"
echo "fuzz: targets built in $(( $(date +%s) - started ))s"

targets=("$@")
if ((${#targets[@]} == 0)); then
    mapfile -t targets < <(sed -n 's/^name = "\(.*\)"$/\1/p' Cargo.toml | grep -vx bkpool-fuzz)
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
status=0
for t in "${targets[@]}"; do
    mkdir -p "$scratch/$t" "artifacts/$t"
    cp corpus/"$t"/seed-* "$scratch/$t/"
    log="$scratch/$t.log"
    if "$CARGO_TARGET_DIR/$triple/release/$t" -max_total_time="$seconds" -max_len=65536 \
        -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$scratch/$t" >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        status=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    echo "fuzz: $t: $result, ${execs:-?} execs in ${seconds}s (${rate:-?}/s)"
    if [ "$result" != ok ]; then
        tail -n 40 "$log"
    fi
done
echo "fuzz: finished in $(( $(date +%s) - started ))s"
exit $status
