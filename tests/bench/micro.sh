#!/usr/bin/env bash
# Microbenchmarks of the data path (daemon/benches, divan): route lookups
# against ip_network_table, lookups while a writer republishes the table,
# boringtun encapsulate/decapsulate, and the MSS clamp. Runs them and records
# divan's table in BENCHMARKS.md (the previous run moves to "Older runs").
#
#   tests/bench/micro.sh [--no-record] [DIVAN ARGS...]
#
# Needs no root. Respects CARGO_TARGET_DIR. DIVAN ARGS go to both bench
# binaries, e.g. a filter: `tests/bench/micro.sh --no-record lookup_v4`.
# `cargo bench -p vpcgated` runs the same benchmarks (plus the library's
# test harness in bench mode, which has none).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RECORD=1
if [ "${1:-}" = --no-record ]; then
    RECORD=0
    shift
fi

out=$(mktemp /tmp/vpcgate-micro.XXXXXX)
trap 'rm -f "$out"' EXIT

cd "$ROOT"
cargo bench -p vpcgated --bench routing --bench packet -- --color never "$@" 2>&1 | tee "$out"

report=(python3 "$ROOT/tests/bench/report.py" micro "$out" --root "$ROOT")
if ((RECORD)); then
    report+=(--record "$ROOT/BENCHMARKS.md")
    "${report[@]}" >/dev/null
    echo "recorded in $ROOT/BENCHMARKS.md"
fi
