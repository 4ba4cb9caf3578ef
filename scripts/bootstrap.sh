#!/usr/bin/env bash
# Installs everything hushgate needs on a Debian 12 machine (as root): the system packages
# (apt-get, skipped when already present) and a virtualenv with hushgate and its test tools.
# Usage: bash scripts/bootstrap.sh            -> .venv with hushgate installed (editable)
set -euo pipefail
cd "$(dirname "$0")/.."

PACKAGES=(python3-venv python3-dev build-essential libnetfilter-queue-dev iptables iproute2
          conntrack ipset tcpdump dnsmasq-base nftables prometheus shellcheck
          chromium chromium-driver fonts-liberation systemd
          qemu-system-x86 busybox-static kmod  # these three: the nftables VM suite, tests/vm
          mosquitto)  # the MQTT broker of tests/e2e/test_phone_live.py
missing=()
for pkg in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "bootstrap: missing system packages (${missing[*]}); run as root" >&2
    exit 1
  fi
  echo "bootstrap: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[test]"
echo "bootstrap: ready ($(.venv/bin/hushgate --version))"
