#!/usr/bin/env bash
# Builds the guest agent as a static binary (it is PID 1 in a guest with no
# dynamic loader of ours) into target/agent/…/tvm-agent.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS="-C target-feature=+crt-static" \
  cargo build --quiet -p tvm-agent --release --target x86_64-unknown-linux-gnu --target-dir target/agent
echo "agent: target/agent/x86_64-unknown-linux-gnu/release/tvm-agent"
