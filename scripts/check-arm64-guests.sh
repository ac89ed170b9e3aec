#!/usr/bin/env bash
# arm64 (aarch64) guests on this x86_64 host, under QEMU TCG emulation
# (docs/arm64.md): builds the arm64 guest kernel (linux-source-6.1, the pinned
# arm64 fragment, gcc-aarch64-linux-gnu), cross-builds the static agent in a
# Debian trixie build root, builds the default Python and C images for arm64
# (mmdebstrap --architectures=arm64 through qemu-user in binfmt_misc), then
# boots `qemu-system-aarch64 -M virt` through tvm: hello and a limit verdict
# in each language, and nothing left behind. Everything is cached under
# TVM's cache dir, keyed by its inputs; from empty caches on 2 cores it costs
# what docs/arm64.md says (too much for CI's budget, so it lives outside CI).
set -uo pipefail
cd "$(dirname "$0")/.."
ws=$(pwd)
tvm=${TVM_BIN:-$ws/target/release/tvm}
started=$(date +%s)
phase() { echo "arm64: $1 ($(( $(date +%s) - started ))s so far)"; }

export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static mmdebstrap; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
  timeout 900 apt-get install -y --no-install-recommends "${need[@]}" >/dev/null || { echo "0 passed, 1 failed (apt-get install ${need[*]})"; exit 1; }
fi
# mmdebstrap runs arm64 maintainer scripts through qemu-user: register it
# (the kernel-wide binfmt_misc entry Debian's qemu-user-static ships).
if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
  mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc || { echo "0 passed, 1 failed (binfmt_misc)"; exit 1; }
fi
if [ ! -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ]; then
  cat /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register || { echo "0 passed, 1 failed (binfmt register)"; exit 1; }
fi
phase "tools ready"

timeout 1800 bash scripts/build-agent-aarch64.sh || { echo "0 passed, 1 failed (agent cross-build)"; exit 1; }
phase "agent built"

export TVM_GUEST_ARCH=aarch64
unset TVM_AGENT_BIN
# tvm looks for an agent beside itself first; the one there is x86_64, so it
# takes target/agent/aarch64-unknown-linux-gnu (crates/pyrovm agent_path).
timeout 2400 "$tvm" kernel build || { echo "0 passed, 1 failed (arm64 kernel)"; exit 1; }
phase "kernel built"
for r in python-3.13 c-gcc-14; do
  timeout 1800 "$tvm" image build "$r" || { echo "0 passed, 1 failed (arm64 image $r)"; exit 1; }
done
phase "images built"

rundir=$(mktemp -d /tmp/tvm-arm64-test.XXXXXX)
src=$(mktemp -d /tmp/tvm-arm64-src.XXXXXX)
trap 'rm -rf "$rundir" "$src"' EXIT
# Emulated aarch64 is slow (Python's start alone took ~50 s on the loaded
# 2-core host): compile limits at the catalog's maximum through an overlay;
# hello runs get --time-limit 120s, the limit verdicts keep short limits.
mkdir -p "$rundir/overlay" "$rundir/run"
cat > "$rundir/overlay/50-arm64-tcg.toml" <<'EOF'
[[runtime]]
id = "c-gcc-14"
compile_limits = { wall = "120s", cpu = "120s" }
EOF
export TVM_RUNTIME_DIR=$rundir/run TVM_RUNTIMES_DIR=$rundir/overlay TVM_ACCEL=tcg TVM_VMM=qemu
before=$(pgrep -c -f '^qemu-system-aarch64 ' || true)

cat > "$src/main.py" <<'EOF'
import platform
print("hello from", platform.machine(), platform.python_version())
EOF
cat > "$src/spin.py" <<'EOF'
while True:
    pass
EOF
cat > "$src/main.c" <<'EOF'
#include <stdio.h>
#include <sys/utsname.h>
int main(void) {
    struct utsname u;
    uname(&u);
    printf("hello from %s\n", u.machine);
    return 0;
}
EOF
cat > "$src/hog.c" <<'EOF'
#include <stdlib.h>
#include <string.h>
int main(void) {
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p) return 3;
        memset(p, 1, 1 << 20);
    }
}
EOF

pass=0 fail=0
check() { # name, expected exit, expected stdout substring, tvm run args...
  local name=$1 want_rc=$2 want_out=$3; shift 3
  local out rc
  out=$(timeout 600 "$tvm" run "$@" 2>&1 </dev/null); rc=$?
  if [ "$rc" = "$want_rc" ] && [[ "$out" == *"$want_out"* ]]; then
    pass=$((pass + 1)); echo "ok   $name (exit $rc)"
  else
    fail=$((fail + 1)); echo "FAIL $name: exit $rc (want $want_rc), output: ${out:0:400}"
  fi
}
check "python hello on aarch64" 0 "hello from aarch64 3.13" -r python-3.13 --time-limit 120s "$src/main.py"
check "python time limit verdict" 124 "" -r python-3.13 --time-limit 2s "$src/spin.py"
check "c hello on aarch64" 0 "hello from aarch64" -r c-gcc-14 --time-limit 120s "$src/main.c"
check "c memory limit verdict" 137 "" -r c-gcc-14 --memory-limit 64M "$src/hog.c"

# Nothing left behind: no VMM of ours still running, an empty runtime dir.
sleep 1
after=$(pgrep -c -f '^qemu-system-aarch64 ' || true)
left=$(find "$rundir/run" -mindepth 1 2>/dev/null | head -5)
if [ "$after" -le "$before" ] && [ -z "$left" ]; then
  pass=$((pass + 1)); echo "ok   nothing left behind"
else
  fail=$((fail + 1)); echo "FAIL left behind: qemu-system-aarch64 $before -> $after; runtime dir: $left"
fi
phase "tests done"
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
