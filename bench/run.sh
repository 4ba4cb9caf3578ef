#!/usr/bin/env bash
# The whole benchmark suite in one command (as root, on a Debian 12 machine): installs what it
# needs (the venv of scripts/bootstrap.sh, plus iperf3, socat and haproxy), then runs every
# benchmark in turn, each measuring its modes side by side in one run and printing a table with
# ratios.
# Usage: bash bench/run.sh [--quick] [--soak]
#   --quick  fewer rounds (about 7 minutes instead of about 17): for a first look, not for figures
#   --soak   also the 10-minute soak (bench/soak.py), about 11 minutes more
set -euo pipefail
cd "$(dirname "$0")/.."

quick=0
soak=0
for arg in "$@"; do
  case "$arg" in
    --quick) quick=1 ;;
    --soak) soak=1 ;;
    *) echo "usage: bash bench/run.sh [--quick] [--soak]" >&2; exit 2 ;;
  esac
done
if [ "$(id -u)" -ne 0 ]; then
  echo "bench/run.sh: the live benchmarks build network namespaces: run it as root" >&2
  exit 1
fi

bash scripts/bootstrap.sh
missing=()
for pkg in iperf3 socat haproxy; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bench: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=.venv/bin/python
if [ "$quick" -eq 1 ]; then
  runs=1; rounds=500; hold=15; per=60
else
  runs=3; rounds=2000; hold=60; per=130
fi

section() { printf '\n==== %s (%s)\n' "$1" "$(date -u +%H:%M:%S)"; }
echo "machine: $(nproc) vCPU, $(uname -r), $(${PY} --version 2>&1), load $(cut -d' ' -f1-3 /proc/loadavg)"

section "detection quality on ../shared/captures"
${PY} bench/eval_captures.py
section "hushgate analyze against a bare dpkt loop (200,000 packets)"
${PY} bench/analyze_bench.py --runs "$runs"
section "forwarding: no guard, bare consumer, dpkt consumer, fast path, inspected"
${PY} bench/forwarding.py --runs "$runs" --scaling
section "added latency per inspected packet (live, pinned to one vCPU)"
taskset -c 1 ${PY} bench/latency.py --runs "$runs" --rounds "$rounds" --udp
section "per-packet cost of the daemon's callback (offline)"
${PY} bench/latency.py --offline --runs "$runs"
section "holding: memory per held upload, and the caps"
${PY} bench/holding.py --hold-seconds "$hold" --per-speaker "$per"
section "footprint: RSS and CLI start-up"
${PY} bench/footprint.py
section "relay (tcp_hold = relay): new connections, round trips, conn/s, bulk, RSS vs kernel and C relays"
if [ "$quick" -eq 1 ]; then ${PY} bench/relay.py --quick; else ${PY} bench/relay.py --runs "$runs"; fi
if [ "$soak" -eq 1 ]; then
  section "soak: 10 minutes of mixed traffic"
  ${PY} bench/soak.py --minutes 10
fi
