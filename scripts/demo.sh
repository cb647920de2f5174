#!/usr/bin/env bash
# The main job end to end: a volume mirrored over QUIC to a local applier, served as
# /dev/ublkbN, with ext4 made, mounted and filled; status while the mirror catches up; then
# the replica is verified (e2fsck, mounted read-only, file checksums, byte-for-byte compare).
#
# Natively when this host has the ublk driver (/dev/ublk-control); otherwise inside the VM
# harness (ublk/vm/run), which boots Debian's 6.12 kernel with ublk_drv under qemu.
# Run as root after scripts/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release --locked
bin="$PWD/target/release/ublk-mirror"
if [ -e /dev/ublk-control ]; then
    echo "demo: this host has the ublk driver: running natively"
    work=$(mktemp -d /tmp/ublk-mirror-demo.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    WORK="$work" PATH="$(dirname "$bin"):$PATH" sh scripts/demo-ublk.sh
else
    echo "demo: this host's kernel has no ublk driver (no /dev/ublk-control): running the demo inside"
    echo "      a VM with Debian's 6.12 kernel (ublk/vm/run; software emulation, so it is slow; the"
    echo "      first run downloads the kernel package, ~34 MB, into ~/.cache/ublk-mirror)"
    UBLK_MIRROR_BIN="$bin" ublk/vm/run scripts/demo-ublk.sh
fi
