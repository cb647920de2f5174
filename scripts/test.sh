#!/usr/bin/env bash
# The whole test suite, from a fresh machine: install packages, check formatting and lints,
# build, run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
cargo fmt --check
cargo clippy --locked --all-targets -- -D warnings
cargo test --locked 2>&1
