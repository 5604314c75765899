#!/usr/bin/env bash
# The soak (not in CI): churn through a standalone gateway (terminate and passthrough) and a
# bkpool local whose pool sleeps and wakes, byte-checked, with a certificate reload every
# minute; RSS, open files, threads, connections and pipes sampled every 10 s into a CSV.
#
#   benches/soak.sh                 # one hour
#   benches/soak.sh --minutes 10    # shorter
#   BKPOOL_SOAK_CSV=/tmp/soak.csv benches/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=60
while (($#)); do
    case $1 in
        --minutes) minutes=$2; shift 2 ;;
        *) echo "usage: benches/soak.sh [--minutes N]" >&2; exit 2 ;;
    esac
done
cargo bench --locked --bench soak --no-run
exec env BKPOOL_SOAK_MINUTES="$minutes" cargo bench --locked --bench soak
