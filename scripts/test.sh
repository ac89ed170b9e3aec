#!/usr/bin/env bash
# The test suite: unit tests plus integration tests that boot real microVMs
# (KVM where a probe boot proves it works, TCG otherwise). Needs what
# scripts/setup.sh installs and builds; it reuses the kernel and image caches.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/build-agent.sh
cargo build --quiet --release -p tvm
target/release/tvm kernel build
# Every available runtime version is tested; images are cached by recipe.
target/release/tvm image build --all
# Two test threads: each VM test boots its own guest, and this keeps two guests at most per core pair.
cargo test --workspace --no-fail-fast -- --test-threads=2
