#!/usr/bin/env bash
# Validates TVM's Firecracker backend with the REAL Firecracker, on a host
# with working KVM. (CI and hosts without KVM test the same backend against
# the stand-in: crates/tvm/tests/firecracker.rs; see docs/firecracker.md.)
#
# Needs: /dev/kvm read-write; the official `firecracker` and `jailer`
# release binaries (https://github.com/firecracker-microvm/firecracker/releases,
# v1.16.x) in PATH or named by FIRECRACKER= and JAILER=; what scripts/setup.sh
# builds (target/release/tvm, the kernel, the default images). Run as root to
# exercise the jailer (chroot, own uid/gid, cgroups, network namespace); as
# another user, TVM's own confinement is used and the script says so.
#
# It checks: backend selection (tvm doctor), a boot and hello world in the
# default runtime of every language, templates as Firecracker snapshots
# (three runs restored from one: start=template, the host's clock, distinct
# /dev/urandom bytes; the vsock reconnect after restore is on that path),
# that nothing is left behind (run dirs,
# firecracker processes, jailer chroots and cgroups), then prints
# `tvm bench --vmm firecracker` figures (the table docs/performance.md uses).
# Exit status: 0 when every check passed.
set -euo pipefail
cd "$(dirname "$0")/.."
TVM=${TVM:-target/release/tvm}
export TVM_VMM=firecracker
export TVM_FIRECRACKER=${FIRECRACKER:-firecracker}
export TVM_JAILER=${JAILER:-jailer}
export TVM_RUNTIME_DIR=${TVM_RUNTIME_DIR:-$(mktemp -d /tmp/tvm-fc-smoke.XXXXXX)}
RUNS=${RUNS:-5}
fail=0
say() { printf '==> %s\n' "$*"; }
bad() { printf 'FAIL: %s\n' "$*" >&2; fail=1; }

[ -x "$TVM" ] || { echo "no $TVM: run scripts/setup.sh first" >&2; exit 2; }
[ -r /dev/kvm ] && [ -w /dev/kvm ] || { echo "/dev/kvm is not usable by $(id -un): Firecracker needs KVM" >&2; exit 2; }
command -v "$TVM_FIRECRACKER" >/dev/null || { echo "no firecracker binary ($TVM_FIRECRACKER)" >&2; exit 2; }
if "$TVM_FIRECRACKER" --version 2>/dev/null | grep -q stand-in; then
  echo "$TVM_FIRECRACKER is TVM's stand-in, not Firecracker; this script validates the real one" >&2
  exit 2
fi

say "firecracker: $("$TVM_FIRECRACKER" --version | head -1)"
command -v "$TVM_JAILER" >/dev/null && say "jailer: $("$TVM_JAILER" --version 2>&1 | head -1)" || say "jailer: not found"
say "tvm doctor (backend, versions, KVM, jailer)"
"$TVM" doctor | grep -E '^(ok  |FAIL) (vmm|firecracker|kvm|accelerator|qemu version)' || true
"$TVM" doctor --json | python3 -c '
import json, sys
checks = {c["name"]: c for c in json.load(sys.stdin)["checks"]}
vmm = checks["vmm"]
print("vmm:", vmm["detail"])
sys.exit(0 if vmm["ok"] and vmm["detail"].startswith("firecracker") else 1)' || bad "tvm doctor does not select Firecracker"

say "hello world in the default runtime of every language"
for f in examples/hello.py examples/hello.js examples/hello.c examples/hello.cpp; do
  out=$("$TVM" run --json "$f") || true
  python3 - "$f" "$out" <<'PY' || bad "$f"
import json, sys
name, raw = sys.argv[1], sys.argv[2]
v = json.loads(raw)
ok = v.get("verdict") == "ok" and v.get("vmm") == "firecracker" and v.get("accel") == "kvm"
print(f"{name:<22} verdict={v.get('verdict')} vmm={v.get('vmm')} accel={v.get('accel')} boot_ms={v.get('boot_ms')} total_ms={v.get('total_ms')}")
sys.exit(0 if ok else 1)
PY
done
for pair in "rb:puts 'hello'" "go:package main
import \"fmt\"
func main() { fmt.Println(\"hello\") }" "rs:fn main() { println!(\"hello\"); }"; do
  ext=${pair%%:*}; src=${pair#*:}
  d=$(mktemp -d); f="$d/main.$ext"; printf '%s\n' "$src" > "$f"
  out=$("$TVM" run "$f" 2>&1) || true
  [ "$out" = "hello" ] && say "main.$ext: hello" || bad "main.$ext: $out"
  rm -rf "$d"
done
d=$(mktemp -d); printf 'public class Main { public static void main(String[] a) { System.out.println("hello"); } }\n' > "$d/Main.java"
out=$("$TVM" run "$d/Main.java" 2>&1) || true
[ "$out" = "hello" ] && say "Main.java: hello" || bad "Main.java: $out"
rm -rf "$d"

say "templates: Firecracker snapshots (PATCH /vm, PUT /snapshot/create, PUT /snapshot/load)"
# The CLI builds a missing template inline, then restores from it: every
# run here must say start=template (a note means it cold booted, and why).
d=$(mktemp -d)
printf 'import os, time\nprint(os.urandom(16).hex(), int(time.time()))\n' > "$d/unique.py"
seen=""
for i in 1 2 3; do
  out=$(TVM_TEMPLATES=1 "$TVM" run --json "$d/unique.py") || true
  line=$(python3 - "$out" <<'PY'
import json, sys, time
v = json.loads(sys.argv[1])
rand, t = (v.get("run") or {}).get("stdout", "- 0").split()
ok = v.get("verdict") == "ok" and v.get("start") == "template" and abs(int(t) - time.time()) <= 2
print(("ok " if ok else "bad ") + rand, f"start={v.get('start')} note={v.get('start_note')} boot_ms={v.get('boot_ms')} total_ms={v.get('total_ms')}")
PY
) || true
  say "restore $i: ${line#* }"
  case "$line" in ok*) ;; *) bad "restore $i did not run from a template with the host's clock" ;; esac
  rand=$(printf '%s' "$line" | cut -d' ' -f2)
  case " $seen " in *" $rand "*) bad "two restored VMs saw the same /dev/urandom bytes" ;; esac
  seen="$seen $rand"
done
rm -rf "$d"
"$TVM" template list || bad "tvm template list"

say "nothing left behind"
left=$(ls -A "$TVM_RUNTIME_DIR" | grep -v '^jail-uids$' || true)
[ -z "$left" ] || bad "run dirs left: $left"
[ -z "$(ls -A "$TVM_RUNTIME_DIR/jail-uids" 2>/dev/null)" ] || bad "jailer uid claims left"
pgrep -f "TVM_RUN_DIR=$TVM_RUNTIME_DIR" >/dev/null && bad "VMM processes left" || true
ls -d /srv/jailer/*/tvm-* 2>/dev/null && bad "jailer chroots left" || true
ls -d /sys/fs/cgroup/tvm-firecracker/tvm-* 2>/dev/null && bad "jailer cgroups left" || true

say "tvm bench --vmm firecracker ($RUNS runs per runtime)"
"$TVM" bench --runs "$RUNS" || bad "tvm bench"

rm -rf "$TVM_RUNTIME_DIR"
if [ $fail -eq 0 ]; then echo "firecracker smoke: all checks passed"; else echo "firecracker smoke: FAILED" >&2; fi
exit $fail
