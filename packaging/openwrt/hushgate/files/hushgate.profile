# hushgate: installed as /etc/profile.d/hushgate.sh, so `hushgate pending`, `allow`, `deny`
# and `watch` find the guard's control socket (OpenWrt keeps it under /var/run).
# shellcheck shell=sh
HUSHGATE_SOCKET=$(uci -q get hushgate.guard.socket 2>/dev/null) ||
	HUSHGATE_SOCKET=/var/run/hushgate/control.sock
export HUSHGATE_SOCKET
