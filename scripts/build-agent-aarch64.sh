#!/usr/bin/env bash
# Cross-builds the guest agent statically for aarch64 guests into
# target/agent/aarch64-unknown-linux-gnu/release/tvm-agent (see docs/arm64.md).
#
# rustup cannot download the aarch64 standard library here, so the build runs
# in a Debian trixie build root: Debian's rustc/cargo 1.85 with the matching
# `libstd-rust-dev:arm64` (multiarch) and `gcc-aarch64-linux-gnu` as linker
# (static glibc from libc6-dev-arm64-cross). On an aarch64 host the native
# build (scripts/build-agent.sh with the host target) needs none of this.
#
# The build root is cached under TVM's cache dir, keyed by its inputs (suite,
# package list, recipe version: scripts/lib/trixie-root.sh):
# ~/.cache/tvm/buildroot/<key>/root, and the crates it downloads in
# ~/.cache/tvm/buildroot/cargo-home. Needs root (mmdebstrap --mode=root, bind
# mounts); every mount is undone on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
ws=$(pwd)
source scripts/lib/trixie-root.sh
# (The root's key is computed from this list: keep it as it is, or the root is made again.)
trixie_root "rustc,cargo,libstd-rust-dev:arm64,gcc-aarch64-linux-gnu,libc6-dev-arm64-cross,ca-certificates"
TRIXIE_ENV=(CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_LINKER=aarch64-linux-gnu-gcc
  CARGO_TARGET_AARCH64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static")
trixie_chroot "$TRIXIE_ROOT" "$ws" \
  "cargo build --quiet -p tvm-agent --release --target aarch64-unknown-linux-gnu --target-dir target/agent"
file target/agent/aarch64-unknown-linux-gnu/release/tvm-agent 2>/dev/null | grep -q "ARM aarch64.*statically linked" ||
  { echo "build-agent-aarch64: the agent is not a static aarch64 executable" >&2; exit 1; }
echo "agent: target/agent/aarch64-unknown-linux-gnu/release/tvm-agent"
