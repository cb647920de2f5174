#!/usr/bin/env bash
# Installs what ublk-mirror needs on Debian/Ubuntu (run as root): build tools and the real
# clients the tests and benchmarks use (qemu-io, qemu-img, qemu-nbd, fio, e2fsprogs), and qemu to
# boot a ublk-capable kernel where the host's lacks it.
set -euo pipefail
# qemu-system-x86, busybox-static, cpio, xz-utils: the VM harness (ublk/vm/run) for hosts whose
# kernel lacks ublk. Recommends are skipped: qemu-system-x86 would pull in a desktop's worth.
packages=(build-essential pkg-config libclang-dev qemu-utils qemu-system-x86 busybox-static cpio xz-utils
    fio e2fsprogs util-linux procps python3)
if [ "$(id -u)" -ne 0 ]; then
    echo "setup.sh: run as root (it calls apt-get install)" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update
apt-get install -y --no-install-recommends "${packages[@]}"
if ! command -v cargo >/dev/null 2>&1; then
    echo "setup.sh: cargo not found: install a Rust toolchain >= 1.80 (https://rustup.rs), then rerun" >&2
    exit 1
fi
