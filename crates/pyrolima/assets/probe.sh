#!/bin/bash
# tvm-lima: readiness probe. Lima runs it (as the VM's user) until it exits 0 before
# `limactl start` reports the instance ready; each run waits up to ~40 s.
set -u
ready() {
  local body
  body=$(curl -sS --max-time 5 http://127.0.0.1:8080/readyz 2>/dev/null) || return 1
  # 200 {"ready":true}: every image built. 503 with "draining":false: serving, while other
  # versions' images build in the background (the default versions are built before the start).
  case "$body" in
    *'"ready":true'* | *'"draining":false'*) return 0 ;;
  esac
  return 1
}
for _ in 1 2 3 4 5 6 7 8 9 10; do
  ready && exit 0
  sleep 3
done
echo "TVM is not ready yet: $(cat /var/log/tvm-lima/progress 2>/dev/null || echo 'provisioning has not started')" >&2
exit 1
