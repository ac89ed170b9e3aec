#!/usr/bin/env bash
# The test suite: unit tests plus integration tests that boot real microVMs
# (KVM where a probe boot proves it works, TCG otherwise). Needs what
# scripts/setup.sh installs and builds; it reuses the kernel and image caches.
# Then every suite in scripts/tests.d/ (sorted); each installs what it needs
# itself. All of them run even after a failure; the exit status says whether any failed.
set -uo pipefail
cd "$(dirname "$0")/.."
set -e
scripts/build-agent.sh
cargo build --quiet --release -p tvm
cp target/agent/x86_64-unknown-linux-gnu/release/tvm-agent target/release/tvm-agent
target/release/tvm kernel build
# Every available runtime version is tested; images are cached by recipe.
# From empty caches the image builds (packages, dpkg, mkfs.erofs) and the
# test binaries' compilation run side by side: each leaves the other's idle time.
target/release/tvm image build --all --jobs 2 &
images=$!
if ! cargo test --workspace --no-run --quiet; then
  kill -TERM "$images" 2>/dev/null; wait "$images"; exit 1   # tvm cancels and cleans up its builds on SIGTERM
fi
wait "$images"
set +e
failed=()
# Two test threads: each VM test boots its own guest, and this keeps two guests at most per core pair.
cargo test --workspace --no-fail-fast -- --test-threads=2 || failed+=("cargo test")
for suite in scripts/tests.d/*.sh; do
  [ -e "$suite" ] || continue
  echo "==> $suite"
  start=$SECONDS
  bash "$suite" || failed+=("$suite")
  echo "==> $suite took $((SECONDS - start)) s"
done
if [ ${#failed[@]} -gt 0 ]; then
  df -h / /tmp >&2   # a full disk shows up as unrelated failures
  echo "FAILED: ${failed[*]}" >&2
  exit 1
fi
