"""The `hushgate` command.

Rules of this module: imports are lazy (`hushgate --help` must stay fast on a router), every
handled error is one line on stderr with exit 1, usage errors exit 2 (click's own), and listings
take `--json`. Commands that talk to the daemon take `--socket` (default from the config, or the
HUSHGATE_SOCKET environment variable).
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
    from guard.analyze import analyze_capture, format_table
    from guard.capture import CaptureError
    from guard.config import ConfigError, load_config
    from guard.ruleset import RuleError, load_rules

    try:
        config = load_config(config_path) if config_path else None
        rules = load_rules([rules_dir] if rules_dir else [])
    except (ConfigError, RuleError) as exc:
        fail(str(exc))
    cleanup = None
    if capture is None:
        import tempfile

        from guard.synth import write_session

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
    else:
        click.echo(format_table(result))


@main.group()
def rules() -> None:
    """Vendor rule files."""


@rules.command("check")
@click.argument("directory", required=False, type=click.Path())
@click.option("--no-builtin", is_flag=True, help="Check only DIRECTORY, not the shipped rules.")
def rules_check(directory: str | None, no_builtin: bool) -> None:
    """Validate rule files; errors are reported as file:line: message."""
    from guard.ruleset import check_dirs, load_rules

    dirs = [directory] if directory else []
    errors = check_dirs(dirs, builtin=not no_builtin)
    for error in errors:
        click.echo(str(error), err=True)
    if errors:
        sys.exit(1)
    ruleset = load_rules(dirs, builtin=not no_builtin)
    click.echo(f"ok: {len(ruleset.hosts)} host patterns, {len(ruleset.ouis)} OUIs, "
               f"{len(ruleset.hints)} address hints, vendors: {', '.join(sorted(ruleset.vendors))}")


if __name__ == "__main__":  # pragma: no cover
    main()
