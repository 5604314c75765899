#!/usr/bin/env bash
# The test command: `cargo test --workspace --locked` (extra arguments are passed on), then the
# list of tests that skipped and why. cargo counts a skipped test as passed, so the tests record
# their skips in BKPOOL_SKIP_LOG (control::testkit::skip) and this lists them. With CI set, a
# test that would skip fails instead, and the list stays empty.
set -uo pipefail
cd "$(dirname "$0")/.."
skips=$(mktemp)
trap 'rm -f "$skips"' EXIT
BKPOOL_SKIP_LOG=$skips cargo test --workspace --locked "$@"
status=$?
if [ -s "$skips" ]; then
    echo
    echo "SKIPPED $(wc -l <"$skips") test(s): they passed without running. Why:"
    sort "$skips" | awk -F'\t' '{ printf "  %s\n      %s\n", $1, $2 }'
fi
exit $status
