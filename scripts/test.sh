#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install packages, build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo test --locked 2>&1
