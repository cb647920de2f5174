#!/usr/bin/env bash
# Benchmark of the ublk frontend: fio inside the VM harness's guest against /dev/ublkbN served
# by ublk-mirror (with and without a live mirror) and by the `loop` example shipped inside the
# libublk crate (built here from the registry package, never copied into this repository), on
# the same backing file. Prints a table with ratios to the libublk loop example.
#
# Usage: benches/ublk-vm.sh   (as root, after scripts/setup.sh; BENCH_SECONDS=15 per fio job)
# Under software emulation (TCG) absolute numbers mean little; compare the ratios.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v fio >/dev/null || { echo "fio not found: run scripts/setup.sh" >&2; exit 1; }
cargo build --release --locked --quiet
version=$(sed -n 's/^libublk = "=\(.*\)"$/\1/p' Cargo.toml)
registry_copy=$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -maxdepth 1 -mindepth 1 -type d | head -n 1)/libublk-$version
[ -d "$registry_copy" ] || cargo fetch --locked
build="${XDG_CACHE_HOME:-$HOME/.cache}/ublk-mirror/libublk-loop-$version"
if [ ! -x "$build/src/target/release/examples/loop" ]; then
    echo "building libublk $version's loop example in $build" >&2
    rm -rf "$build" && mkdir -p "$build" && cp -r "$registry_copy" "$build/src"
    (cd "$build/src" && cargo build --release --example loop --quiet)
fi
export UBLK_VM_EXTRA="fio $build/src/target/release/examples/loop"
export UBLK_MIRROR_BIN="$PWD/target/release/ublk-mirror"
export UBLK_VM_ENV="BENCH_SECONDS=${BENCH_SECONDS:-15}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
ublk/vm/run benches/ublk-guest.sh | tee "$log" | grep -E '^(==|RESULT)' >&2
echo
echo "ublk frontend inside the VM guest (qemu TCG: absolute numbers are emulation-bound; read the ratios)"
printf '%-20s %-18s %10s %10s %10s\n' target job IOPS MB/s "vs loop"
awk '/^RESULT/ { target[NR] = $2; job[NR] = $3; iops[NR] = $4; mbs[NR] = $5; if ($2 == "libublk-loop") base[$3] = $4; n = NR }
     END { for (i = 1; i <= n; i++) if (job[i] != "") printf "%-20s %-18s %10d %10.1f %9.2fx\n", target[i], job[i], iops[i], mbs[i], (base[job[i]] > 0 ? iops[i] / base[job[i]] : 0) }' "$log"
