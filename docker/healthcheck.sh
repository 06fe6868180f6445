#!/bin/bash
# Container health check for a processor: HTTP GET /health on its own metrics listener
# (METRICS_ADDR, default 0.0.0.0:9100), healthy only on a 200. It uses bash's /dev/tcp so
# the slim runtime image needs no curl. The listener must bind 0.0.0.0 (or 127.0.0.1):
# the probe runs inside the container and connects to loopback.
set -euo pipefail

addr=${METRICS_ADDR:-0.0.0.0:9100}
port=${addr##*:}
case $port in
  '' | *[!0-9]*) echo "healthcheck: cannot read a port from METRICS_ADDR=$addr" >&2; exit 1 ;;
esac

if ! { exec 3<>"/dev/tcp/127.0.0.1/$port"; } 2>/dev/null; then
  echo "healthcheck: nothing listens on 127.0.0.1:$port" >&2
  exit 1
fi
printf 'GET /health HTTP/1.1\r\nHost: 127.0.0.1:%s\r\nConnection: close\r\n\r\n' "$port" >&3

status=
if ! IFS= read -r -t 3 status <&3; then
  echo "healthcheck: no answer from 127.0.0.1:$port/health" >&2
  exit 1
fi
# Read the rest of the answer so the server is not reset mid-write.
while IFS= read -r -t 2 _ <&3; do :; done || true
exec 3<&-

case $status in
  "HTTP/1."[01]" 200"*) exit 0 ;;
  *) echo "healthcheck: /health answered: ${status%$'\r'}" >&2; exit 1 ;;
esac
