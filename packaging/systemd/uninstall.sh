#!/bin/sh
# Uninstall hushgate from a Debian-style gateway (the install of docs/install.md), leaving no
# firewall rule, no control socket and no running guard behind.
#
#   sh uninstall.sh           stop and disable the service, remove every hushgate rule (IPv4,
#                             IPv6, nftables), the socket, the unit, the venv and the symlink
#   sh uninstall.sh --purge   also delete the config (/etc/hushgate) and the state
#                             (always-rules, windows, audit log: /var/lib/hushgate)
#
# Paths can be overridden for a non-standard install: HUSHGATE_VENV (/opt/hushgate),
# HUSHGATE_CONFIG (/etc/hushgate/hushgate.toml), HUSHGATE_UNIT
# (/etc/systemd/system/hushgate.service), HUSHGATE_LINK (/usr/local/bin/hushgate).
# Exit status: 0 when nothing of hushgate is left in the kernel, 1 otherwise.
set -u

VENV=${HUSHGATE_VENV:-/opt/hushgate}
CONFIG=${HUSHGATE_CONFIG:-/etc/hushgate/hushgate.toml}
UNIT=${HUSHGATE_UNIT:-/etc/systemd/system/hushgate.service}
LINK=${HUSHGATE_LINK:-/usr/local/bin/hushgate}
PURGE=0

for arg in "$@"; do
	case "$arg" in
	--purge) PURGE=1 ;;
	-h | --help)
		sed -n '2,14s/^# \{0,1\}//p' "$0"
		exit 0
		;;
	*)
		echo "uninstall: unknown argument $arg (try --help)" >&2
		exit 2
		;;
	esac
done

say() { echo "uninstall: $*"; }

if [ "$(id -u)" -ne 0 ]; then
	echo "uninstall: must run as root" >&2
	exit 1
fi

# 1. The service: stopping it makes the guard remove its own queue rules.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
	if systemctl list-unit-files hushgate.service >/dev/null 2>&1; then
		systemctl disable --now hushgate.service >/dev/null 2>&1 && say "service stopped and disabled"
	fi
fi

# 2. A guard started by hand from this venv (`$VENV/bin/hushgate run ...`): SIGTERM, then wait.
guard_pids() {
	for dir in /proc/[0-9]*; do
		[ -r "$dir/cmdline" ] || continue
		if tr '\0' '\n' <"$dir/cmdline" 2>/dev/null |
			awk -v bin="$VENV/bin/hushgate" 'prev == bin && $0 == "run" { found = 1 } { prev = $0 } END { exit !found }'; then
			echo "${dir#/proc/}"
		fi
	done
}
pids=$(guard_pids)
if [ -n "$pids" ]; then
	# shellcheck disable=SC2086 # one pid per word
	kill -TERM $pids 2>/dev/null
	tries=0
	while [ -n "$(guard_pids)" ] && [ "$tries" -lt 150 ]; do
		sleep 0.1
		tries=$((tries + 1))
	done
	left=$(guard_pids)
	if [ -n "$left" ]; then
		# shellcheck disable=SC2086
		kill -KILL $left 2>/dev/null
		sleep 0.2
	fi
	say "stopped guard process(es): $(echo "$pids" | tr '\n' ' ')"
fi

# 3. Where the config put the socket and the state (defaults if it cannot be read).
SOCKET=/run/hushgate/control.sock
STATE_DB=/var/lib/hushgate/state.db
if [ -x "$VENV/bin/python" ] && [ -f "$CONFIG" ]; then
	paths=$("$VENV/bin/python" -c 'import sys
from guard.core.config import load_config
c = load_config(sys.argv[1])
print(c.socket)
print(c.state_db)' "$CONFIG" 2>/dev/null) && {
		SOCKET=$(echo "$paths" | sed -n 1p)
		STATE_DB=$(echo "$paths" | sed -n 2p)
	}
fi

# 4. Every hushgate rule: the safety net included (it outlives a stopped guard by design).
removed=0
if [ -x "$VENV/bin/hushgate" ]; then
	if [ -f "$CONFIG" ]; then
		"$VENV/bin/hushgate" firewall remove --config "$CONFIG" && removed=1
	else
		"$VENV/bin/hushgate" firewall remove && removed=1
	fi
fi
if [ "$removed" -ne 1 ]; then
	# Without a working venv: delete every jump to a HUSHGATE* chain, then the chains.
	for tool in iptables ip6tables; do
		command -v "$tool-save" >/dev/null 2>&1 || continue
		for table in mangle filter raw; do
			"$tool-save" -t "$table" 2>/dev/null | awk -v t="$table" '
				/^:HUSHGATE/ { sub(/^:/, "", $1); chains[++n] = $1; next }
				/^-A / && $2 !~ /^HUSHGATE/ && / -[jg] HUSHGATE/ { sub(/^-A/, "-D"); print "-t " t " " $0 }
				END { for (i = 1; i <= n; i++) print "-t " t " -F " chains[i];
				      for (i = 1; i <= n; i++) print "-t " t " -X " chains[i] }' |
				while read -r rule; do
					# shellcheck disable=SC2086 # the rule is split into its words on purpose
					"$tool" -w $rule 2>/dev/null
				done
		done
	done
	if command -v nft >/dev/null 2>&1; then
		printf 'table inet hushgate {}\ndelete table inet hushgate\n' | nft -f - 2>/dev/null
	fi
	say "removed hushgate rules without the venv"
fi

# 5. The control socket (the guard removes it when it stops; not after a crash).
if [ -S "$SOCKET" ] || [ -e "$SOCKET" ]; then
	rm -f "$SOCKET" && say "removed $SOCKET"
fi
rmdir "$(dirname "$SOCKET")" 2>/dev/null

# 6. The unit, the symlink and the venv.
if [ -f "$UNIT" ]; then
	rm -f "$UNIT" && say "removed $UNIT"
	if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
		systemctl daemon-reload
	fi
fi
if [ -L "$LINK" ] && [ "$(readlink "$LINK")" = "$VENV/bin/hushgate" ]; then
	rm -f "$LINK" && say "removed $LINK"
fi
if [ -d "$VENV" ] && [ -x "$VENV/bin/python" ]; then
	rm -rf "$VENV" && say "removed $VENV"
fi

# 7. Config and state, only when asked.
if [ "$PURGE" -eq 1 ]; then
	rm -rf "$(dirname "$CONFIG")" && say "removed $(dirname "$CONFIG")"
	rm -rf "$(dirname "$STATE_DB")" && say "removed $(dirname "$STATE_DB")"
else
	say "kept $(dirname "$CONFIG") and $STATE_DB (use --purge to delete them)"
fi

# 8. Verify: nothing of hushgate may be left in the kernel or running.
left=0
for tool in iptables-save ip6tables-save; do
	command -v "$tool" >/dev/null 2>&1 || continue
	if "$tool" 2>/dev/null | grep -qi hushgate; then
		echo "uninstall: $tool still shows hushgate rules" >&2
		left=1
	fi
done
if command -v nft >/dev/null 2>&1 && nft list table inet hushgate >/dev/null 2>&1; then
	echo "uninstall: nftables table inet hushgate is still loaded" >&2
	left=1
fi
if [ -n "$(guard_pids)" ]; then
	echo "uninstall: a guard process is still running" >&2
	left=1
fi
if [ -e "$SOCKET" ]; then
	echo "uninstall: $SOCKET is still there" >&2
	left=1
fi
[ "$left" -eq 0 ] && say "done: no hushgate rule, socket or process left"
exit "$left"
