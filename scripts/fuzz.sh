#!/usr/bin/env bash
# Fuzzes every target in fuzz/ for a bounded time (default 20 s each) and fails on the first
# crash. Builds the targets with plain cargo on a stable toolchain (RUSTC_BOOTSTRAP=1 lets it
# read fuzz/Cargo.toml's nightly-only per-package rustflags), so neither cargo-fuzz nor
# nightly is needed. Each target starts from a scratch copy of its committed corpus (seed-*),
# so a run adds nothing to the tree.
#
#   scripts/fuzz.sh [--full] [SECONDS_PER_TARGET] [TARGET...]
#
# Two builds (see fuzz/README.md for what each costs):
#   default  the cheap build CI uses (profile `fuzz-ci`): only bkpool's crates are
#            instrumented; the dependencies are built at opt-level 0 with no coverage, so a
#            cold build takes about half the full one's CPU, and libFuzzer sees no edges inside
#            the dependencies' own code (toml's parser, x509-parser, aws-lc and the like).
#   --full   what `cargo fuzz build -O --sanitizer none` does: every crate in release with
#            coverage. Costlier to build cold, better guided inside dependency code; use it
#            for long runs on a machine that keeps its build.
#
# Prints the build time, one line per target (the libFuzzer exec count and rate) and the fuzz
# time. A crash leaves its input in fuzz/artifacts/<target>/ (replay it with the target
# binary, then keep it as fuzz/corpus/<target>/seed-crash-<what> so `cargo test` replays it
# from then on).
set -euo pipefail
cd "$(dirname "$0")/../fuzz"
full=0
if [ "${1:-}" = --full ]; then
    full=1
    shift
fi
seconds=${1:-20}
shift || true
triple=$(rustc -vV | sed -n 's/^host: //p')
export CARGO_TARGET_DIR=${FUZZ_TARGET_DIR:-$PWD/target}
# fuzz/Cargo.toml uses `cargo-features = ["profile-rustflags"]`; this makes stable cargo
# accept it (and stable rustc the -C flags below).
export RUSTC_BOOTSTRAP=1
# cargo-fuzz's instrumentation flags (SanitizerCoverage for libFuzzer), without a sanitizer.
# The cheap build sets the same flags per package in fuzz/Cargo.toml.
sancov="-Cpasses=sancov-module -Cllvm-args=-sanitizer-coverage-level=4 \
-Cllvm-args=-sanitizer-coverage-inline-8bit-counters -Cllvm-args=-sanitizer-coverage-pc-table \
-Cllvm-args=-sanitizer-coverage-trace-compares -Cllvm-args=-sanitizer-coverage-stack-depth \
--cfg fuzzing -Cdebug-assertions -Coverflow-checks"
if ((full)); then
    profile=release
    export RUSTFLAGS=$sancov
else
    profile=fuzz-ci
    # RUSTFLAGS would go to every crate, dependencies included: the profile says who gets what.
    unset RUSTFLAGS CARGO_ENCODED_RUSTFLAGS
fi
started=$(date +%s)
# --target keeps build scripts and proc macros uninstrumented, as cargo-fuzz does.
cargo build --locked --profile "$profile" --bins --target "$triple"
built=$(date +%s)
echo "fuzz: targets built ($profile) in $((built - started))s"

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
    # -timeout: one input running a minute is a hang (and a failure); libFuzzer's default of
    # 20 minutes would hold a bounded run far past its time.
    if "$CARGO_TARGET_DIR/$triple/$profile/$t" -max_total_time="$seconds" -max_len=65536 \
        -timeout=60 -artifact_prefix="artifacts/$t/" -print_final_stats=1 "$scratch/$t" \
        >"$log" 2>&1; then
        result=ok
    else
        result=CRASH
        status=1
    fi
    execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    cov=$(grep -o 'cov: [0-9]* ft: [0-9]*' "$log" | tail -n 1)
    echo "fuzz: $t: $result, ${execs:-?} execs in ${seconds}s (${rate:-?}/s), ${cov:-no coverage}"
    if [ "$result" != ok ]; then
        tail -n 40 "$log"
    fi
done
echo "fuzz: ${#targets[@]} target(s) fuzzed in $(( $(date +%s) - built ))s," \
    "finished in $(( $(date +%s) - started ))s"
exit $status
