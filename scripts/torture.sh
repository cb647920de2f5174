#!/usr/bin/env bash
# The fault campaign: seeded end-to-end trials with crashes, power cuts, partitions, packet
# loss, journal overflow and disk errors against real processes (README: "Fault campaign").
#
#   scripts/torture.sh --trials 1000 --seed 20000          # about 35 min on 2 CPUs
#   scripts/torture.sh --trials 1 --seed 20417              # replay one seed
#   scripts/torture.sh --trials 50 --faults power-cut,overflow
#
# Prints one line per trial (every 50 trials past 50) and the summary table; exits non-zero
# if any trial failed. Builds the dev profile (what `cargo test` builds).
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --trials N (default 20), --seed S (default: the test's), --faults LIST"
    echo "fault kinds: kill-source kill-applier power-cut partition loss overflow disk-source disk-applier"
    echo "             (disk = both disk kinds; default: all of them)"
    echo "environment: TORTURE_JOBS (trials at a time, default 2), TORTURE_DIR (default /dev/shm), TORTURE_KEEP=1"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --trials) export TORTURE_TRIALS="$2"; shift 2 ;;
        --seed) export TORTURE_SEED="$2"; shift 2 ;;
        --faults) export TORTURE_FAULTS="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
done

# Build first, quietly, so compiler output does not bury the campaign's.
cargo test --test torture --no-run --quiet
exec cargo test --quiet --test torture fault_campaign -- --nocapture --test-threads 1
