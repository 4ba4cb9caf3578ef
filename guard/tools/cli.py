"""The `hushgate` command.

Rules of this module: imports are lazy (`hushgate --help` must stay fast on a router), every
handled error is one line on stderr with exit 1, usage errors exit 2 (click's own), and listings
take `--json`. Commands that talk to the daemon take `--socket` (else $HUSHGATE_SOCKET, else
`--config`'s guard.socket, else /run/hushgate/control.sock). Text from the daemon goes through
`printable()` before it reaches a terminal: host names come from speakers.
"""

from __future__ import annotations

import json
import sys
from typing import Any, NoReturn

import click

from guard import __version__


def fail(message: str) -> NoReturn:
    click.echo(f"hushgate: {message}", err=True)
    sys.exit(1)


# What optional parts (left out of the OpenWrt package) are, and how to get them.
_OPTIONAL_HINTS = {
    "dpkt": "dpkt, which is not installed (opkg install python3-dpkt, or pip install dpkt)",
    "hushsim": "the simulated home (hushsim), which this install leaves out (as the OpenWrt "
                 "package does); run it on a Linux PC (pip install hushgate)",
}


def need_optional(module: str, what: str, instead: str = "") -> None:
    """Exit with one line saying what `what` lacks and how to get it, when `module` (or an
    optional module it imports) cannot be imported."""
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as exc:
        name = exc.name or module
        hint = next((h for key, h in _OPTIONAL_HINTS.items()
                     if name == key or name.startswith(key + ".")),
                    f"the Python module {name}, which is not installed")
        fail(f"{what} needs {hint}" + (f"; {instead}" if instead else ""))


def emit_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=None, sort_keys=False))


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hushgate")
def main() -> None:
    """hushgate: holds smart speakers' audio uploads until a person approves."""


@main.command()
@click.argument("capture", required=False, type=click.Path(dir_okay=False))
@click.option("--device", "devices", multiple=True, metavar="ADDR_OR_MAC",
              help="A speaker to inspect (repeatable). Default: found from the rules.")
@click.option("--mode", type=click.Choice(["strict", "followups", "monitor"]), default="strict",
              show_default=True, help="The policy mode to apply to every speaker.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False),
              help="Take thresholds (window_segments, max_turn_s, ...) from this config file.")
@click.option("--rules-dir", type=click.Path(file_okay=False), help="Extra rules directory.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object.")
def analyze(capture: str | None, devices: tuple[str, ...], mode: str, config_path: str | None,
            rules_dir: str | None, as_json: bool) -> None:
    """Run the guard's engine over a pcap/pcapng capture and report uploads.

    Without CAPTURE, analyzes a simulated Echo session that hushgate generates itself.
    """
    from guard.core.config import ConfigError, load_config
    from guard.core.ruleset import RuleError, load_rules
    from guard.tools.analyze import analyze_capture, format_table
    from guard.tools.capture import CaptureError

    try:
        config = load_config(config_path) if config_path else None
        rules = load_rules([rules_dir] if rules_dir else [])
    except (ConfigError, RuleError) as exc:
        fail(str(exc))
    cleanup = None
    if capture is None:
        import tempfile

        need_optional("hushsim.synth", "analyze without a capture (a simulated session)",
                      "or analyze a capture of your own: hushgate analyze FILE.pcap")
        from hushsim.synth import write_session

        tmp = tempfile.TemporaryDirectory(prefix="hushgate-")
        cleanup = tmp
        capture = f"{tmp.name}/simulated-echo-session.pcap"
        write_session(capture)
        if not as_json:
            click.echo("No capture given: analyzing a simulated Echo session "
                       "(voice uploads, events, telemetry, a blocked message, a call).\n")
    try:
        result = analyze_capture(capture, devices, mode, config=config, rules=rules)
    except (CaptureError, OSError, ValueError) as exc:
        fail(str(exc))
    finally:
        if cleanup is not None:
            cleanup.cleanup()
    if as_json:
        emit_json(result)
        return
    click.echo(format_table(result))
    if not result["devices"] and cleanup is None:
        from guard.tools.analyze import busiest_lan_hosts

        click.echo("\nNo speaker recognised: no vendor MAC prefix (rules/*.toml) and no voice "
                   "host name in the capture.")
        try:
            hosts = busiest_lan_hosts(capture)
        except (CaptureError, OSError) as exc:
            fail(str(exc))
        if not hosts:
            click.echo("No LAN host sent anything to the Internet in it.")
            return
        click.echo("The LAN hosts that sent the most to the Internet; name a speaker with "
                   "--device ADDR:")
        for host in hosts:
            click.echo(f"  {host['address']:<40} {host['bytes_up'] / 1000:10.1f} KB up "
                       f"to {host['remotes']} address(es)")


@main.group()
def rules() -> None:
    """Vendor rule files (`rules check`); your windows, mutes and always-rules (`rules list`,
    `rules revoke`)."""


@rules.command("check")
@click.argument("directory", required=False, type=click.Path())
@click.option("--no-builtin", is_flag=True, help="Check only DIRECTORY, not the shipped rules.")
def rules_check(directory: str | None, no_builtin: bool) -> None:
    """Validate rule files; errors are reported as file:line: message."""
    from guard.core.ruleset import check_dirs, load_rules

    dirs = [directory] if directory else []
    errors = check_dirs(dirs, builtin=not no_builtin)
    for error in errors:
        click.echo(str(error), err=True)
    if errors:
        sys.exit(1)
    ruleset = load_rules(dirs, builtin=not no_builtin)
    click.echo(f"ok: {len(ruleset.hosts)} host patterns, {len(ruleset.ouis)} OUIs, "
               f"{len(ruleset.hints)} address hints, vendors: {', '.join(sorted(ruleset.vendors))}")


# ------------------------------------------------------------------------ talking to the daemon

DEFAULT_SOCKET = "/run/hushgate/control.sock"
HOST_WIDTH = 48  # host names come from speakers: capped before they reach a terminal
NAME_WIDTH = 24


def printable(value: Any, width: int | None = None) -> str:
    """Text from the daemon (host names are attacker-controlled) made inert for a terminal:
    anything but printable ASCII becomes '?', so no escape sequence survives; then capped."""
    if value is None:
        return "-"
    text = "".join(c if " " <= c <= "~" else "?" for c in str(value))
    if width is not None and len(text) > width:
        text = text[: max(width - 3, 1)] + "..."
    return text


def daemon_options(func: Any) -> Any:
    """`--socket PATH` and `--config FILE`, accepted after the subcommand."""
    func = click.option(
        "--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
        help="Take the socket path from this config file's guard.socket.",
    )(func)
    return click.option(
        "--socket", "socket_path", metavar="PATH",
        help=f"Control socket. Default: $HUSHGATE_SOCKET, else --config's guard.socket, "
             f"else {DEFAULT_SOCKET}.",
    )(func)


def socket_for(socket_path: str | None, config_path: str | None) -> str:
    import os

    if socket_path:
        return socket_path
    if os.environ.get("HUSHGATE_SOCKET"):
        return os.environ["HUSHGATE_SOCKET"]
    if config_path:
        from guard.core.config import ConfigError, load_config

        try:
            return load_config(config_path).socket
        except ConfigError as exc:
            fail(str(exc))
    return DEFAULT_SOCKET


def call(socket_path: str | None, config_path: str | None, payload: dict[str, Any]) -> Any:
    """One request to the daemon; every failure is one line on stderr and exit 1."""
    from guard.shell.control import ControlError, request

    path = socket_for(socket_path, config_path)
    try:
        return request(path, payload)
    except ControlError as exc:
        fail(printable(str(exc)))


def rendered(render: Any, value: Any) -> str:
    """A table from a daemon reply; a reply of the wrong shape is a one-line error."""
    try:
        return str(render(value))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        fail(f"unexpected reply from hushgate ({type(exc).__name__}: {printable(exc, 80)})")


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()
             for row in [headers, *rows]]
    return "\n".join(lines)


def human_bytes(n: Any) -> str:
    n = int(n or 0)
    if n < 1000:
        return f"{n} B"
    if n < 1_000_000:
        return f"{n / 1000:.0f} KB"
    if n < 1_000_000_000:
        return f"{n / 1e6:.1f} MB"
    return f"{n / 1e9:.1f} GB"


def human_age(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.0f} d"


def clock(ts: Any) -> str:
    import time

    if ts is None:
        return "-"
    ts = float(ts)
    fmt = "%H:%M:%S" if abs(time.time() - ts) < 43200 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def target(item: dict[str, Any]) -> str:
    """TO: the host name when one is known, else the remote address."""
    return printable(item.get("host") or item.get("remote"), HOST_WIDTH)


class Duration(float):
    """Seconds that remember how the person typed them ("400d" stays "400d")."""

    text: str

    def __new__(cls, seconds: float, text: str) -> Duration:
        value = super().__new__(cls, seconds)
        value.text = text
        return value


def window_duration_option(ctx: click.Context, param: click.Parameter, value: str | None
                           ) -> Duration | None:
    """A window's --for: a duration from 1s to 30d, kept as typed."""
    if value is None:
        return None
    from guard.core.policy import check_window_duration, parse_duration

    try:
        try:
            seconds = parse_duration(value)
        except ValueError as exc:
            if "positive" not in str(exc):
                raise
            seconds = 0.0  # "0s": said below with the bounds
        seconds = check_window_duration(seconds, value.strip())
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return Duration(seconds, value.strip())


def duration_option(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    if value is None:
        return None
    from guard.core.policy import parse_duration

    try:
        return parse_duration(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def whoami() -> str:
    """`by` for decisions made here. The daemon also sees the caller's uid (SO_PEERCRED)."""
    import os
    import pwd

    try:
        return f"cli:{pwd.getpwuid(os.getuid()).pw_name}"
    except KeyError:
        return f"cli:{os.getuid()}"


# ------------------------------------------------------------------------------- the listings


def format_status(status: dict[str, Any]) -> str:
    uptime = status.get("uptime_s")
    head = [f"hushgate {printable(status.get('version'))}"]
    if uptime is not None:
        head.append(f"up {human_age(uptime)}")
    head.append(f"fail mode: {printable(status.get('fail_mode'))}")
    if status.get("queue") is not None:
        head.append(f"queue {printable(status['queue'])}")
    if status.get("backend"):
        head.append(f"backend {printable(status['backend'])}")
    pending = int(status["pending"])
    held = (f"{int(status.get('held_packets') or 0)} pkt/"
            f"{human_bytes(status.get('held_bytes'))} held")
    lines = [", ".join(head),
             f"pending uploads: {pending}" + (f" ({held})" if pending else "")]
    devices = status.get("devices") or []
    if devices:
        lines.append("")
        lines.append(table(
            ["DEVICE", "MODE", "MAC", "ADDRESS"],
            [[printable(d["name"], NAME_WIDTH), mode_text(d), printable(d.get("mac")),
              printable(d.get("address"), 40)] for d in devices],
        ))
        lines.extend(mode_note(devices))
    else:
        lines.append("no devices configured")
    return "\n".join(lines)


def mode_text(d: dict[str, Any]) -> str:
    """A device's mode, with a star when `hushgate mode` set it over the config file's."""
    return printable(d.get("mode")) + ("*" if d.get("mode_overridden") else "")


def mode_note(devices: list[dict[str, Any]]) -> list[str]:
    overridden = [d for d in devices if d.get("mode_overridden")]
    if not overridden:
        return []
    said = ", ".join(f"{printable(d['name'], NAME_WIDTH)}: {printable(d.get('configured_mode'))}"
                     for d in overridden)
    return ["", f"* set with `hushgate mode` (kept across restarts); the config file says {said}"]


def format_pending(uploads: list[dict[str, Any]], now: float) -> str:
    if not uploads:
        return "no pending uploads"
    rows = []
    for u in uploads:
        category = u.get("category")
        what = "audio upload" if category in (None, "voice") else f"upload ({printable(category, 16)})"
        rows.append([
            printable(u["id"], 12),
            printable(u.get("device"), NAME_WIDTH),
            target(u),
            what,
            f"{int(u.get('held_packets') or 0)} pkt/{human_bytes(u.get('held_bytes'))}",
            human_age(now - float(u["started"])),
        ])
    return table(["ID", "DEVICE", "TO", "WHAT", "HELD", "WAITING"], rows)


def format_devices(devices: list[dict[str, Any]], now: float) -> str:
    if not devices:
        return "no devices configured"

    def state(d: dict[str, Any]) -> str:
        if "online" not in d:
            return "-"
        return "online" if d["online"] else (
            f"seen {human_age(now - float(d['last_seen']))} ago" if d.get("last_seen")
            else "not seen")

    def counts(d: dict[str, Any]) -> str:
        figures = d.get("counts_24h") or {}
        return ", ".join(f"{printable(k, 12)} {int(v)}" for k, v in sorted(figures.items())
                         if v) or "-"

    lines = table(
        ["DEVICE", "MODE", "MAC", "ADDRESS", "FLOWS", "UPLOADS", "STATE", "LAST UPLOAD",
         "PENDING", "MUTED UNTIL", "LAST 24 H"],
        [[printable(d["name"], NAME_WIDTH), mode_text(d), printable(d.get("mac")),
          printable(d.get("address"), 40), printable(d.get("flows", 0)),
          printable(d.get("uploads", 0)), state(d), clock(d.get("last_upload")),
          printable(d.get("pending", "-")), clock(d.get("mute_until")), counts(d)]
         for d in devices],
    )
    return "\n".join([lines, *mode_note(devices)])


def format_rules(entries: list[dict[str, Any]], now: float) -> str:
    if not entries:
        return "no windows, mutes or always-rules"
    rows = []
    for e in entries:
        until = e.get("until")
        left = (f"until {clock(until)} ({human_age(float(until) - now)} left)"
                if until is not None else "always")
        typed = e.get("duration_text")
        rows.append([printable(e["id"], 12), printable(e.get("kind"), 14),
                     printable(e.get("device"), NAME_WIDTH),
                     printable(e.get("host") or e.get("category") or "every upload", HOST_WIDTH),
                     left + (f", {printable(typed, 16)}" if typed else ""),
                     printable(e.get("source"), 24)])
    return table(["ID", "KIND", "DEVICE", "FOR", "LASTS", "MADE BY"], rows)


def format_flows(flows: list[dict[str, Any]], now: float) -> str:
    if not flows:
        return "no flows"
    return table(
        ["DEVICE", "TO", "PROTO", "CATEGORY", "STATE", "UP", "DOWN", "IDLE"],
        [[printable(f.get("device"), NAME_WIDTH), target(f), printable(f.get("proto"), 5),
          printable(f.get("category"), 14), printable(f.get("state"), 12),
          human_bytes(f.get("bytes_up")), human_bytes(f.get("bytes_down")),
          human_age(now - float(f["last"])) if f.get("last") is not None else "-"]
         for f in flows],
    )


def format_log(records: list[dict[str, Any]]) -> str:
    if not records:
        return "no audit records"

    def size(r: dict[str, Any]) -> str:
        if r.get("outcome") == "blocked":
            attempts = int(r.get("attempts") or 1)
            return f"0 B, {attempts} attempt{'s' if attempts != 1 else ''}"
        return f"{int(r.get('packets') or 0)} pkt/{human_bytes(r.get('bytes'))}"

    return table(
        ["TIME", "DEVICE", "TO", "CATEGORY", "SIZE", "OUTCOME", "BY"],
        [[clock(r.get("decided_at")), printable(r.get("device"), NAME_WIDTH), target(r),
          printable(r.get("category"), 14), size(r),
          printable(r.get("outcome"), 12), printable(r.get("decided_by"), 20)]
         for r in records],
    )


@main.command(short_help="Fail mode, devices and what is held.")
@click.option("--json", "as_json", is_flag=True, help="Print the daemon's status object.")
@daemon_options
def status(as_json: bool, socket_path: str | None, config_path: str | None) -> None:
    """Fail mode, devices, pending uploads and held bytes of the running guard."""
    result = call(socket_path, config_path, {"cmd": "status"})
    if as_json:
        emit_json(result)
    else:
        click.echo(rendered(format_status, result))


@main.command(short_help="Uploads waiting for a decision.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of uploads.")
@daemon_options
def pending(as_json: bool, socket_path: str | None, config_path: str | None) -> None:
    """Uploads held for a decision (answer with `allow ID` or `deny ID`)."""
    import time

    result = call(socket_path, config_path, {"cmd": "pending"})
    if as_json:
        emit_json(result)
    else:
        click.echo(rendered(lambda r: format_pending(r, time.time()), result))


def decide_or_window(verb: str, upload_id: int | None, for_s: Duration | None, always: bool,
                     device: str | None, socket_path: str | None,
                     config_path: str | None) -> None:
    if device is not None:
        if upload_id is not None:
            raise click.UsageError("give an upload ID or --device NAME, not both")
        if always:
            raise click.UsageError("--always decides one upload's host; with --device use --for")
        if for_s is None:
            raise click.UsageError(f"{verb} --device NAME needs --for DURATION (e.g. 30m)")
        kind = "allow" if verb == "allow" else "quiet"
        window = call(socket_path, config_path, {
            "cmd": "window", "device": device, "kind": kind, "duration_s": float(for_s),
            "duration_text": for_s.text, "by": whoami(),
        })
        what = ("uploads pass, logged" if kind == "allow"
                else "uploads denied at once, no prompt")

        def said(w: dict[str, Any]) -> str:
            line = (f"{kind} window for {printable(w['device'], NAME_WIDTH)} until "
                    f"{clock(w['until'])} ({printable(w.get('duration_text') or for_s.text, 16)})"
                    f": {what}")
            if w.get("id"):
                line += f" [{printable(w['id'], 12)}]"
            if w.get("superseded"):
                ended = ", ".join(printable(i, 12) for i in w["superseded"])
                line += (f"; ended {'the mute' if kind == 'allow' else 'the allow window'} "
                         f"{ended}")
            return line

        click.echo(rendered(said, window))
        return
    if upload_id is None:
        raise click.UsageError(
            "give an upload ID (see `hushgate pending`), or --device NAME --for DURATION"
        )
    if always and for_s is not None:
        raise click.UsageError("--for and --always are exclusive")
    scope = "always" if always else "for" if for_s is not None else "once"
    request: dict[str, Any] = {
        "cmd": "decide", "id": upload_id, "verb": verb, "scope": scope,
        "duration_s": float(for_s) if for_s is not None else None, "by": whoami(),
    }
    if for_s is not None:
        request["duration_text"] = for_s.text
    upload = call(socket_path, config_path, request)

    def say(u: dict[str, Any]) -> str:
        held = f"{int(u.get('held_packets') or 0)} pkt/{human_bytes(u.get('held_bytes'))}"
        done = "released" if verb == "allow" else "discarded, connection reset"
        past = "allowed" if verb == "allow" else "denied"
        line = (f"{past} {printable(u.get('id', upload_id), 12)}: "
                f"{printable(u.get('device'), NAME_WIDTH)} to {target(u)} ({held} {done})")
        if scope == "for":
            line += (f"; the same for {printable(u.get('device'), NAME_WIDTH)}'s "
                     f"{printable(u.get('category') or 'unknown', 14)} uploads for "
                     f"{printable(for_s.text if for_s is not None else '', 16)}")
            if u.get("window"):
                line += f" [{printable(u['window'], 12)}]"
        elif scope == "always":
            line += "; always, as a standing rule"
            if u.get("rule"):
                line += f" [{printable(u['rule'], 12)}; `hushgate rules revoke` removes it]"
        return line

    click.echo(rendered(say, upload))


@main.command(short_help="Release a held upload, or open an allow window.")
@click.argument("upload_id", metavar="[ID]", required=False, type=click.IntRange(min=0))
@click.option("--for", "for_s", metavar="DURATION", callback=window_duration_option,
              help="Also allow the device's uploads of this category for a while (1s to "
                   "30d: 90s, 30m, 2h); with --device, an allow window (it ends a mute).")
@click.option("--always", is_flag=True, help="Also allow this device and host from now on.")
@click.option("--device", metavar="NAME", help="Open an allow window for a device (with --for).")
@daemon_options
def allow(upload_id: int | None, for_s: Duration | None, always: bool, device: str | None,
          socket_path: str | None, config_path: str | None) -> None:
    """Release a held upload, in order; or open an allow window for a device."""
    decide_or_window("allow", upload_id, for_s, always, device, socket_path, config_path)


@main.command(short_help="Discard a held upload, or mute a device.")
@click.argument("upload_id", metavar="[ID]", required=False, type=click.IntRange(min=0))
@click.option("--for", "for_s", metavar="DURATION", callback=window_duration_option,
              help="With --device: a quiet window (a mute: uploads denied at once, no prompt; "
                   "1s to 30d; `unmute` lifts it). With an ID: also deny the device's uploads "
                   "of this category for a while.")
@click.option("--always", is_flag=True, help="Also deny this device and host from now on.")
@click.option("--device", metavar="NAME", help="Mute a device's uploads (with --for).")
@daemon_options
def deny(upload_id: int | None, for_s: Duration | None, always: bool, device: str | None,
         socket_path: str | None, config_path: str | None) -> None:
    """Discard a held upload and reset its connection; or open a quiet window for a device."""
    decide_or_window("deny", upload_id, for_s, always, device, socket_path, config_path)


@main.group(invoke_without_command=True, short_help="Configured devices; `devices discover`.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of devices.")
@daemon_options
@click.pass_context
def devices(ctx: click.Context, as_json: bool, socket_path: str | None,
            config_path: str | None) -> None:
    """Configured devices with their mode, flows and uploads (or: `devices discover`)."""
    if ctx.invoked_subcommand is not None:
        return
    import time

    result = call(socket_path, config_path, {"cmd": "devices"})
    if as_json:
        emit_json(result)
    else:
        click.echo(rendered(lambda r: format_devices(r, time.time()), result))


@devices.command("discover", short_help="Find speakers on the LAN.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of hosts found.")
@click.option("--leases", "leases", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="A dnsmasq or odhcpd lease file (repeatable). Default: "
              "/tmp/dhcp.leases, /var/lib/misc/dnsmasq.leases, /tmp/hosts/odhcpd.")
@click.option("--neigh/--no-neigh", default=True, show_default=True,
              help="Also read the neighbour table (`ip -j neigh`).")
@click.option("--rules-dir", type=click.Path(file_okay=False), help="Extra rules directory.")
def devices_discover(as_json: bool, leases: tuple[str, ...], neigh: bool,
                     rules_dir: str | None) -> None:
    """Find speakers on the LAN (vendor MAC OUIs in DHCP leases and the neighbour table) and
    print [[device]] tables to paste into the config. Needs no running guard."""
    from guard.core.ruleset import RuleError, load_rules
    from guard.tools.discover import find_speakers, read_sources, report

    try:
        rules = load_rules([rules_dir] if rules_dir else [])
        sightings, read = read_sources(list(leases), neigh=neigh)
    except RuleError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{printable(exc.filename)}: {exc.strerror or exc}")
    found = find_speakers(sightings, rules.vendor_for_mac, rules.kind_for_hostname)
    if as_json:
        emit_json([f.as_dict() for f in found])
        return
    click.echo(report(found, read, len({s.mac for s in sightings})), nl=False)


@main.command(short_help="Connections of the configured devices.")
@click.option("--device", metavar="NAME", help="Only this device's flows.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of flows.")
@daemon_options
def flows(device: str | None, as_json: bool, socket_path: str | None,
          config_path: str | None) -> None:
    """Connections of the configured devices, with host, category and state."""
    import time

    result = call(socket_path, config_path, {"cmd": "flows", "device": device})
    if as_json:
        emit_json(result)
    else:
        click.echo(rendered(lambda r: format_flows(r, time.time()), result))


def outcome_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    from guard.core.policy import LOG_OUTCOMES

    names = list(LOG_OUTCOMES)
    if value.lower() not in names:
        raise click.BadParameter(f"{value!r} is not one of {', '.join(names)}")
    return value.lower()


@main.command(short_help="The audit log, newest first.")
@click.option("--device", metavar="NAME", help="Only this device's uploads.")
@click.option("--since", "since_s", metavar="DURATION", callback=duration_option,
              help="Only entries of the last DURATION (90s, 30m, 2h, 1d).")
@click.option("--until", "until_s", metavar="DURATION", callback=duration_option,
              help="Only entries older than DURATION ago (with --since: a time range).")
@click.option("--outcome", metavar="OUTCOME", callback=outcome_option,
              help="approved, denied, expired, window, quiet, rule, monitored, capped, lost, or "
                   "blocked (refused messaging and calling attempts).")
@click.option("--text", metavar="TEXT", help="Only entries whose device, host or category "
              "contains TEXT (any case).")
@click.option("--limit", type=click.IntRange(min=1, max=10000), default=50, show_default=True,
              help="At most this many records, newest first.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of audit records.")
@daemon_options
def log(device: str | None, since_s: float | None, until_s: float | None, outcome: str | None,
        text: str | None, limit: int, as_json: bool, socket_path: str | None,
        config_path: str | None) -> None:
    """The audit log, newest first: every upload, its true size (what it sent, also after an
    allow) and how it ended; and refused connection attempts of blocked categories (outcome
    blocked, nothing sent)."""
    import time

    now = time.time()
    request: dict[str, Any] = {
        "cmd": "log", "device": device, "since": now - since_s if since_s is not None else None,
        "outcome": outcome, "limit": limit,
    }
    if until_s is not None:
        request["until"] = now - until_s
    if text:
        request["text"] = text
    result = call(socket_path, config_path, request)
    if as_json:
        emit_json(result)
    else:
        click.echo(rendered(format_log, result))


@rules.command("list", short_help="Windows, mutes and always-rules in force.")
@click.option("--device", metavar="NAME", help="Only this device's.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON array of entries.")
@daemon_options
def rules_list(device: str | None, as_json: bool, socket_path: str | None,
               config_path: str | None) -> None:
    """Allow windows, mutes and always-rules in force, with the id `rules revoke` takes (w<N>
    for a window or mute, r<N> for an always-rule)."""
    import time

    result = call(socket_path, config_path, {"cmd": "rules", "device": device})
    if as_json:
        emit_json(result)
    else:
        click.echo(rendered(lambda r: format_rules(r, time.time()), result))


@rules.command("revoke", short_help="Remove a window, mute or always-rule.")
@click.argument("entry_id", metavar="ID")
@daemon_options
def rules_revoke(entry_id: str, socket_path: str | None, config_path: str | None) -> None:
    """Remove one window, mute or always-rule (ID from `hushgate rules list`), at once."""
    import re

    if not re.fullmatch(r"[wrWR]\d{1,18}", entry_id.strip()):
        raise click.BadParameter(f"{printable(entry_id, 32)!r}: use w<N> or r<N> from "
                                 "`hushgate rules list`", param_hint="ID")
    entry = call(socket_path, config_path, {"cmd": "revoke", "id": entry_id.strip().lower(),
                                            "by": whoami()})
    click.echo(rendered(lambda e: (
        f"revoked {printable(e['id'], 12)}: {printable(e.get('kind'), 14)} for "
        f"{printable(e.get('device'), NAME_WIDTH)} "
        f"({printable(e.get('host') or e.get('category') or 'every upload', HOST_WIDTH)})"),
        entry))


@main.command(short_help="Lift a device's mute.")
@click.option("--device", metavar="NAME", required=True, help="The device to unmute.")
@daemon_options
def unmute(device: str, socket_path: str | None, config_path: str | None) -> None:
    """End every mute (quiet window) of a device now: its next upload waits for a decision
    again (as its mode says)."""
    result = call(socket_path, config_path, {"cmd": "unmute", "device": device, "by": whoami()})

    def said(r: dict[str, Any]) -> str:
        name = printable(r["device"], NAME_WIDTH)
        if not r.get("revoked"):
            return f"{name} was not muted"
        return f"unmuted {name} (ended {', '.join(printable(i, 12) for i in r['revoked'])})"

    click.echo(rendered(said, result))


@main.command("mode", short_help="Change a device's mode at run time.")
@click.option("--device", metavar="NAME", required=True, help="The device.")
@click.argument("mode", type=click.Choice(["strict", "followups", "monitor", "off", "config"]))
@daemon_options
def mode_cmd(device: str, mode: str, socket_path: str | None, config_path: str | None) -> None:
    """Set a device's MODE now (strict, followups, monitor, off), kept in the state database
    over the config file's (it survives restarts); `config` goes back to the config file's."""
    result = call(socket_path, config_path, {"cmd": "mode", "device": device, "mode": mode,
                                             "by": whoami()})
    click.echo(rendered(lambda r: (
        f"{printable(r['device'], NAME_WIDTH)}: mode {printable(r['mode'])}"
        + (f" (the config file says {printable(r.get('configured_mode'))}; kept across "
           "restarts)" if r.get("mode_overridden") else " (as the config file says)")), result))


@main.command(short_help="Run the guard in the foreground.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              required=True, help="The guard's config file.")
def run(config_path: str) -> None:
    """Run the guard in the foreground: installs its queue rules (and the safety net if absent),
    serves the control socket, and removes its own dynamic rules on exit."""
    from guard.core.config import ConfigError, load_config
    from guard.shell.daemon import CONFIG_ERROR_NOTE, EXIT_CONFIG
    from guard.shell.daemon import run as run_daemon

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        click.echo(f"hushgate: refusing to start: {exc}; {CONFIG_ERROR_NOTE}", err=True)
        sys.exit(EXIT_CONFIG)
    sys.exit(run_daemon(config))


@main.command(short_help="Exit 0 if the running guard's packet loop is alive.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="The guard's config file (its socket).")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False), metavar="PATH",
              help="The control socket (default: the config's guard.socket).")
@click.option("--max-loop-age", default=30.0, show_default=True, type=float, metavar="S",
              help="Unhealthy when the packet loop has not turned for this long.")
@click.option("--timeout", "timeout_s", default=10.0, show_default=True, type=float, metavar="S",
              help="Unhealthy when the guard does not answer within this.")
@click.option("--kill-hung", is_flag=True,
              help="When unhealthy, SIGKILL the guard that holds the lock (its service manager "
                   "restarts it; the safety net keeps the devices held back meanwhile).")
def health(config_path: str | None, socket_path: str | None, max_loop_age: float,
           timeout_s: float, kill_hung: bool) -> None:
    """The watchdog's check where there is no systemd (OpenWrt: the init script's health
    instance runs it every minute): the guard must answer on its control socket and its packet
    loop must have turned recently. One line; exit 0 healthy, 1 not."""
    import os
    import signal

    from guard.shell.control import ControlError, request

    path = socket_for(socket_path, config_path)
    problem = None
    answer: Any = None
    try:
        answer = request(path, {"cmd": "health"}, timeout_s=timeout_s)
    except ControlError as exc:
        problem = printable(str(exc))
    except OSError as exc:
        problem = f"{path}: {exc.strerror or exc}"
    if problem is None:
        age = float(answer.get("loop_age_s", 0.0)) if isinstance(answer, dict) else 0.0
        if age > max_loop_age:
            problem = f"the packet loop has not turned for {age:.1f} s"
        else:
            click.echo(f"healthy: pid {answer.get('pid')}, loop turned {age:.2f} s ago")
            sys.exit(0)
    pid = None
    if config_path:
        from guard.core.config import ConfigError, load_config
        from guard.shell.daemon import running_guard

        try:
            pid = running_guard(load_config(config_path))
        except ConfigError:
            pid = None
    if kill_hung and pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
            problem += f"; killed the hung guard (pid {pid}) so it is restarted"
        except OSError as exc:
            problem += f"; could not kill pid {pid}: {exc.strerror}"
    elif pid is not None:
        problem += f" (guard pid {pid} holds the lock)"
    fail(f"unhealthy: {problem}")


@main.command(short_help="Answer prompts in this terminal.")
@daemon_options
def watch(socket_path: str | None, config_path: str | None) -> None:
    """An interactive prompt: each held upload appears with its device, host, bytes held and
    time left. Keys: a = allow once, d = deny, w = allow for 30 minutes, s = skip, q = quit."""
    from guard.tools.watch import run_watch

    sys.exit(run_watch(socket_for(socket_path, config_path), stdin=sys.stdin, stdout=sys.stdout,
                       stderr=sys.stderr))


@main.command(short_help="A guided tour in a throw-away network (root).")
def demo() -> None:
    """Build a throw-away network of namespaces (a speaker, a router running the real guard, a
    cloud), and walk through a held upload, an allow, a deny, a blocked message and an untouched
    smart-home request. Needs root; cleans up after itself."""
    for module in ("hushsim.topology", "hushsim.speaker", "hushsim.synth"):
        need_optional(module, "demo")
    from guard.tools.demo import run_demo

    sys.exit(run_demo())


@main.group()
def web() -> None:
    """The LAN web prompt."""


@web.command("token")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              required=True, help="The guard's config file.")
def web_token_cmd(config_path: str) -> None:
    """Print the web prompt's login token (created on first use) and, with TLS, the
    fingerprint of its certificate to check on your phone."""
    import os

    from guard.core.config import ConfigError, load_config
    from guard.shell.daemon import web_state_dir
    from guard.shell.web import WebError, web_token

    try:
        config = load_config(config_path)
    except ConfigError as exc:
        fail(str(exc))
    if not config.web_listen:
        fail(f"{config_path}: the web prompt is off (no [web] listen); add [web] listen = "
             "\"192.168.1.1:8787\" (the router's LAN address) first")
    state_dir = web_state_dir(config)
    names = tuple(h for h in (config.web_listen or "").rsplit(":", 1)[:1] if h) + config.web_hosts
    try:
        info = web_token(os.path.join(state_dir, "web-token"), state_dir, tls=config.web_tls,
                         names=names)
    except (WebError, OSError) as exc:
        fail(str(exc))
    click.echo(f"token: {info['token']}")
    if info.get("fingerprint"):
        click.echo(f"certificate SHA-256 fingerprint: {info['fingerprint']}")
    scheme = "https" if config.web_tls else "http"
    click.echo(f"open: {scheme}://{config.web_listen}/#token={info['token']}")


@main.command(short_help="Check rule order, offloading, IPv6, listener, fail mode.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="The guard's config file.")
@click.option("--json", "as_json", is_flag=True, help="Print the checks as JSON.")
def doctor(config_path: str | None, as_json: bool) -> None:
    """Check that the guard can work on this router, and say what to fix, in one screen."""
    import dataclasses

    from guard.core.config import GuardConfig
    from guard.tools.doctor import diagnose, diagnose_file, exit_code, format_report

    checks = diagnose_file(config_path) if config_path else diagnose(GuardConfig(),
                                                                     config_path=None)
    if as_json:
        emit_json([dataclasses.asdict(c) for c in checks])
    else:
        click.echo(format_report(checks))
    sys.exit(exit_code(checks))


@main.group("config")
def config_group() -> None:
    """Configuration helpers."""


@config_group.command("from-uci")
@click.option("--input", "input_path", default="/etc/config/hushgate", show_default=True,
              type=click.Path(dir_okay=False), help="The UCI config (OpenWrt).")
@click.option("--output", "output_path", type=click.Path(dir_okay=False),
              help="Write the TOML config here (atomically); default: print it.")
@click.option("--fw4-include", "fw4_path", type=click.Path(dir_okay=False),
              help="Also write the nftables include for fw4 (with --output).")
def config_from_uci(input_path: str, output_path: str | None, fw4_path: str | None) -> None:
    """Convert OpenWrt's /etc/config/hushgate into the guard's TOML config."""
    from pathlib import Path

    from guard.core.config import ConfigError
    from guard.tools.uci import uci_to_toml, write_openwrt_files

    try:
        if output_path:
            write_openwrt_files(input_path, output_path, fw4_path)
        else:
            click.echo(uci_to_toml(Path(input_path).read_text(encoding="utf-8")), nl=False)
    except ConfigError as exc:
        fail(str(exc))
    except OSError as exc:
        fail(f"{input_path}: {exc.strerror}")


@config_group.command("keys")
@click.option("--markdown", is_flag=True, help="As docs/config.md (a table per section).")
def config_keys(markdown: bool) -> None:
    """Every configuration key: section, type, default, meaning (from guard/core/schema.py)."""
    from guard.core import schema

    if markdown:
        click.echo(schema.markdown())
        return
    rows = [[f"[{k.section}]", k.name, k.kind, k.default, k.doc] for k in schema.KEYS]
    click.echo(table(["SECTION", "KEY", "TYPE", "DEFAULT", "MEANING"], rows))


# ------------------------------------------------------------------------------------ firewall


def config_or_default(config_path: str | None) -> Any:
    from guard.core.config import ConfigError, GuardConfig, load_config

    if config_path is None:
        return GuardConfig()
    try:
        return load_config(config_path)
    except ConfigError as exc:
        fail(str(exc))


@main.group(short_help="Show, apply or remove the kernel rules.")
def firewall() -> None:
    """The kernel rules: show them, install the persistent part, or remove everything."""


@firewall.command("show")
@click.option("--backend", type=click.Choice(["iptables", "nftables"]), default=None,
              help="Default: the config's guard.backend.")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="Devices, queue, fail mode and mark mask from this config.")
def firewall_show(backend: str | None, config_path: str | None) -> None:
    """Print the rules for the config's devices (queue rules included) without applying them."""
    from guard.shell.firewall import IptablesBackend, NftablesBackend
    from guard.shell.fwspec import spec_from_config

    config = config_or_default(config_path)
    try:
        spec = spec_from_config(config)
    except ValueError as exc:
        fail(str(exc))
    if (backend or config.backend) == "nftables":
        click.echo(NftablesBackend(spec).render(), nl=False)
    else:
        click.echo(IptablesBackend(spec).render())


@firewall.command("apply")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              required=True, help="The guard's config file.")
def firewall_apply(config_path: str) -> None:
    """Install the persistent rules: device dispatch, fast path and the fail-closed safety net.

    They stay until `firewall remove`; queue rules are `hushgate run`'s own.
    """
    from guard.shell.firewall import FirewallError
    from guard.shell.fwspec import apply_persistent

    config = config_or_default(config_path)
    try:
        spec = apply_persistent(config)
    except (FirewallError, ValueError) as exc:
        fail(printable(str(exc)))
    for warning in spec.warnings():
        click.echo(f"hushgate: warning: {printable(warning)}", err=True)
    click.echo(f"applied {config.backend} rules for {len(spec.devices)} device(s), "
               f"fail mode {spec.fail_mode}")


@firewall.command("remove")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), metavar="FILE",
              help="The guard's config file (for its backend).")
def firewall_remove(config_path: str | None) -> None:
    """Remove every hushgate rule, IPv4 and IPv6, the safety net included."""
    from guard.shell.firewall import FirewallError
    from guard.shell.fwspec import remove_everything

    config = config_or_default(config_path)
    try:
        done = remove_everything(config)
    except (FirewallError, ValueError) as exc:
        fail(printable(str(exc)))
    click.echo(f"removed hushgate rules: {', '.join(done)}")


if __name__ == "__main__":  # pragma: no cover
    main()
