"""Detection quality of `hushgate analyze` on the labelled shared captures.

Rules of this file: the metrics are a pure function of (labels, analyze result) pairs,
`evaluate()` for strict mode and `evaluate_followups()` for the followups mode, so tests can feed
them hand-made dicts; everything else is IO around them. Captures are read from
`../shared/captures/` and never copied. The analyze result is the JSON object of design.md
section 8.

    python bench/eval_captures.py [--shared DIR] [--mode strict|followups] [--json] [--check]

Definitions (strict mode):
- a label is *detected* when an upload with action "hold" on the same remote overlaps the
  label's [start, end];
- *leak* is the sum of `leaked_bytes` of the uploads matched to labels (each upload once), as a
  percentage of the labels' `bytes`;
- a *false prompt* is an upload with action "hold" that matches no label (same remote,
  overlapping), counted per hour of capture (last minus first packet, from the flows);
- *release delay* p50/p95 over all `releases[].delay_s` (linear interpolation between ranks).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHARED = REPO.parent / "shared"

# The targets --check enforces (the project's acceptance bar for detection quality).
RECALL_MIN_PCT = 100.0  # issue 13 (the stream hold): every labelled upload
LEAK_MAX_PCT = 0.1
FALSE_PROMPTS_MAX_PER_H = 0.5
DELAY_P95_MAX_S = 0.3  # design.md 5: a message released <= 0.3 s after its last byte
# design.md 6 defaults of the followups mode.
FOLLOWUP_WINDOW_S = 10.0
MAX_TURN_S = 8.0

Labels = dict[str, Any]  # one [[capture]] of labels.toml
Result = dict[str, Any]  # one `hushgate analyze --json` object


# ---------------------------------------------------------------------------------------------
# Pure metrics.


def percentile(values: Iterable[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between closest ranks (numpy's default);
    None for no values."""
    v = sorted(values)
    if not v:
        return None
    pos = (len(v) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def _overlaps(upload: dict, label: dict) -> bool:
    return upload["remote"] == label["remote"] and (
        upload["start"] <= label["end"] and upload["end"] >= label["start"]
    )


def capture_duration_s(result: Result) -> float:
    """Last minus first packet time, from the flows' first/last (or, without flows, from the
    uploads and releases)."""
    flows = result.get("flows") or []
    if flows:
        return max(f["last"] for f in flows) - min(f["first"] for f in flows)
    times = [u[k] for u in result.get("uploads") or [] for k in ("start", "end")]
    times += [r["start"] for r in result.get("releases") or []]
    return max(times) - min(times) if times else 0.0


def _pct(part: float, whole: float) -> float | None:
    return 100.0 * part / whole if whole else None


def _per_h(count: int, duration_s: float) -> float | None:
    if duration_s > 0:
        return count / (duration_s / 3600.0)
    return 0.0 if count == 0 else None


def _name(labels: Labels, result: Result) -> str:
    return str(labels.get("file") or result.get("capture") or "?")


def evaluate(results: Sequence[tuple[Labels, Result]]) -> dict[str, Any]:
    """Strict-mode metrics per capture and overall. `results` pairs a labels.toml capture
    (`device`, `voice`: [{start, end, remote, bytes}]) with the analyze result for it."""
    captures = []
    all_delays: list[float] = []
    tot = {
        "labels": 0,
        "detected": 0,
        "labelled_bytes": 0,
        "leaked_bytes": 0,
        "false_prompts": 0,
        "duration_s": 0.0,
    }
    for labels, result in results:
        voice = list(labels.get("voice") or [])
        held = [u for u in result.get("uploads") or [] if u.get("action") == "hold"]
        matched: dict[int, dict] = {}  # index in held -> upload, each upload counted once
        missed = []
        for label in voice:
            hits = [i for i, u in enumerate(held) if _overlaps(u, label)]
            if not hits:
                missed.append(label)
            for i in hits:
                matched[i] = held[i]
        false = [u for i, u in enumerate(held) if i not in matched]
        labelled_bytes = sum(int(lb["bytes"]) for lb in voice)
        leaked = sum(int(u.get("leaked_bytes") or 0) for u in matched.values())
        delays = [float(r["delay_s"]) for r in result.get("releases") or []]
        duration = capture_duration_s(result)
        detected = len(voice) - len(missed)
        captures.append(
            {
                "capture": _name(labels, result),
                "device": labels.get("device"),
                "labels": len(voice),
                "detected": detected,
                "recall_pct": _pct(detected, len(voice)),
                "labelled_bytes": labelled_bytes,
                "leaked_bytes": leaked,
                "leak_pct": _pct(leaked, labelled_bytes),
                "false_prompts": len(false),
                "false_prompts_per_h": _per_h(len(false), duration),
                "duration_s": duration,
                "releases": len(delays),
                "delay_p50_s": percentile(delays, 50),
                "delay_p95_s": percentile(delays, 95),
                "missed": [
                    {k: lb[k] for k in ("start", "end", "remote", "bytes")} for lb in missed
                ],
                "false": [
                    {k: u.get(k) for k in ("remote", "host", "start", "end", "bytes")}
                    for u in false
                ],
            }
        )
        all_delays += delays
        for key, value in (
            ("labels", len(voice)),
            ("detected", detected),
            ("labelled_bytes", labelled_bytes),
            ("leaked_bytes", leaked),
            ("false_prompts", len(false)),
            ("duration_s", duration),
        ):
            tot[key] += value
    overall = {
        **tot,
        "captures": len(captures),
        "recall_pct": _pct(tot["detected"], tot["labels"]),
        "leak_pct": _pct(tot["leaked_bytes"], tot["labelled_bytes"]),
        "hours": tot["duration_s"] / 3600.0,
        "false_prompts_per_h": _per_h(int(tot["false_prompts"]), tot["duration_s"]),
        "releases": len(all_delays),
        "delay_p50_s": percentile(all_delays, 50),
        "delay_p95_s": percentile(all_delays, 95),
    }
    return {"mode": "strict", "captures": captures, "overall": overall}


def check(summary: dict[str, Any]) -> list[str]:
    """The targets a strict-mode summary misses (empty when it meets them all). A metric with
    nothing to measure (no labels, no releases) does not fail."""
    o = summary["overall"]
    failures = []
    if o["recall_pct"] is not None and o["recall_pct"] < RECALL_MIN_PCT:
        failures.append(f"recall {o['recall_pct']:.1f} % < {RECALL_MIN_PCT:g} %")
    if o["leak_pct"] is not None and o["leak_pct"] > LEAK_MAX_PCT:
        failures.append(f"leak {o['leak_pct']:.2f} % > {LEAK_MAX_PCT:g} %")
    fp = o["false_prompts_per_h"]
    if fp is None or fp > FALSE_PROMPTS_MAX_PER_H:
        shown = "unbounded" if fp is None else f"{fp:.2f}"
        failures.append(f"false prompts {shown}/h > {FALSE_PROMPTS_MAX_PER_H:g}/h")
    if o["delay_p95_s"] is not None and o["delay_p95_s"] > DELAY_P95_MAX_S:
        failures.append(f"release delay p95 {o['delay_p95_s']:.3f} s > {DELAY_P95_MAX_S:g} s")
    return failures


def dialogues(
    voice: Sequence[dict], followup_window_s: float = FOLLOWUP_WINDOW_S
) -> list[list[dict]]:
    """Labels grouped into dialogues: a label that starts within `followup_window_s` of the
    previous label's end is a follow-up turn of the same dialogue."""
    out: list[list[dict]] = []
    prev_end: float | None = None
    for label in sorted(voice, key=lambda lb: lb["start"]):
        if out and prev_end is not None and label["start"] - prev_end <= followup_window_s:
            out[-1].append(label)
        else:
            out.append([label])
        prev_end = label["end"]
    return out


def _observed(uploads: Sequence[dict], label: dict) -> str:
    actions = {u.get("action") for u in uploads if _overlaps(u, label)}
    for action in ("hold", "pass", "block", "monitor"):
        if action in actions:
            return action
    return "undetected" if not actions else min(map(str, actions))


def evaluate_followups(
    results: Sequence[tuple[Labels, Result]],
    followup_window_s: float = FOLLOWUP_WINDOW_S,
    max_turn_s: float = MAX_TURN_S,
) -> dict[str, Any]:
    """Followups-mode expectations per dialogue: the first turn passes (an undetected first
    turn passes too; one longer than `max_turn_s` is held from that point, so "hold" is right for
    it), every follow-up is held, and no upload longer than `max_turn_s` passes whole."""
    rows = []
    long_passed = []
    tot = {
        "dialogues": 0,
        "first_turns": 0,
        "first_turns_ok": 0,
        "followups": 0,
        "followups_held": 0,
    }
    for labels, result in results:
        uploads = list(result.get("uploads") or [])
        for dialogue in dialogues(labels.get("voice") or [], followup_window_s):
            first, rest = dialogue[0], dialogue[1:]
            first_action = _observed(uploads, first)
            first_long = first["end"] - first["start"] > max_turn_s
            first_ok = first_action in (("hold",) if first_long else ("pass", "undetected"))
            follow_actions = [_observed(uploads, lb) for lb in rest]
            held = sum(a == "hold" for a in follow_actions)
            rows.append(
                {
                    "capture": _name(labels, result),
                    "start": first["start"],
                    "turns": len(dialogue),
                    "first_action": first_action,
                    "first_ok": first_ok,
                    "followup_actions": follow_actions,
                    "ok": first_ok and held == len(rest),
                }
            )
            tot["dialogues"] += 1
            tot["first_turns"] += 1
            tot["first_turns_ok"] += first_ok
            tot["followups"] += len(rest)
            tot["followups_held"] += held
        for u in uploads:
            if u.get("action") == "pass" and u["end"] - u["start"] > max_turn_s:
                long_passed.append(
                    {
                        "capture": _name(labels, result),
                        "remote": u["remote"],
                        "start": u["start"],
                        "end": u["end"],
                    }
                )
    overall = {
        **tot,
        "long_passed": len(long_passed),
        "ok": (
            tot["first_turns_ok"] == tot["first_turns"]
            and tot["followups_held"] == tot["followups"]
            and not long_passed
        ),
    }
    return {"mode": "followups", "dialogues": rows, "long_passed": long_passed, "overall": overall}


def check_followups(summary: dict[str, Any]) -> list[str]:
    o = summary["overall"]
    failures = []
    if o["first_turns_ok"] < o["first_turns"]:
        failures.append(f"{o['first_turns'] - o['first_turns_ok']} first turn(s) not passed")
    if o["followups_held"] < o["followups"]:
        failures.append(f"{o['followups'] - o['followups_held']} follow-up(s) not held")
    if o["long_passed"]:
        failures.append(f"{o['long_passed']} upload(s) longer than {MAX_TURN_S:g} s passed whole")
    return failures


# ---------------------------------------------------------------------------------------------
# IO.


def load_labels(shared: Path) -> list[Labels]:
    with (shared / "captures" / "labels.toml").open("rb") as f:
        return list(tomllib.load(f).get("capture", []))


def run(captures: Sequence[Labels], shared: Path, mode: str) -> list[tuple[Labels, Result]]:
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from guard.tools.analyze import analyze_capture

    return [
        (
            cap,
            analyze_capture(
                str(shared / "captures" / cap["file"]), devices=[cap["device"]], mode=mode
            ),
        )
        for cap in captures
    ]


def run_synthetic(mode: str, seed: int, tmp: Path) -> tuple[Labels, Result]:
    """The synthetic session of hushsim.synth (it holds a follow-up dialogue, which the shared
    captures do not), labelled from its own ground truth."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from guard.tools.analyze import analyze_capture
    from hushsim import synth

    path = synth.write_session(tmp / f"synthetic-seed{seed}.pcap", seed)
    labels = synth.session_labels(seed, file=f"synthetic seed {seed}")
    return labels, analyze_capture(str(path), devices=[labels["device"]], mode=mode)


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def format_table(summary: dict[str, Any]) -> str:
    if summary["mode"] == "followups":
        per: dict[str, list[dict]] = {}
        for r in summary["dialogues"]:
            per.setdefault(r["capture"], []).append(r)
        w = max([len("capture")] + [len(name) for name in per])
        lines = [f"{'capture':<{w}} {'dialogues':>9} {'first ok':>8} {'follow-ups held':>15}"]
        for name, rows in per.items():
            follow = sum(len(r["followup_actions"]) for r in rows)
            held = sum(a == "hold" for r in rows for a in r["followup_actions"])
            lines.append(
                f"{name:<{w}} {len(rows):>9} {sum(r['first_ok'] for r in rows):>8} "
                f"{f'{held}/{follow}':>15}"
            )
            for r in rows:  # details for real dialogues and for anything wrong
                if r["followup_actions"] or not r["ok"]:
                    lines.append(
                        f"    dialogue at {r['start']:.3f}: {r['turns']} turns, first "
                        f"{r['first_action']}, follow-ups "
                        f"{','.join(r['followup_actions']) or '-'}: "
                        f"{'ok' if r['ok'] else 'WRONG'}"
                    )
        for u in summary["long_passed"]:
            lines.append(
                f"long upload passed whole: {u['capture']} {u['remote']} "
                f"{u['start']:.3f}-{u['end']:.3f}"
            )
        o = summary["overall"]
        lines.append(
            f"overall: {o['dialogues']} dialogues, first turns ok "
            f"{o['first_turns_ok']}/{o['first_turns']}, follow-ups held "
            f"{o['followups_held']}/{o['followups']}, long uploads passed whole "
            f"{o['long_passed']}"
        )
        return "\n".join(lines)
    w = max([len("capture")] + [len(c["capture"]) for c in summary["captures"]])
    head = (
        f"{'capture':<{w}} {'labels':>6} {'det':>4} {'recall%':>7} {'leak%':>6} "
        f"{'false':>5} {'/h':>6} {'rel':>4} {'p50 s':>6} {'p95 s':>6} {'dur s':>7}"
    )
    lines = [head]
    for c in summary["captures"]:
        lines.append(
            f"{c['capture']:<{w}} {c['labels']:>6} {c['detected']:>4} "
            f"{_f(c['recall_pct'], '.1f'):>7} {_f(c['leak_pct'], '.2f'):>6} "
            f"{c['false_prompts']:>5} {_f(c['false_prompts_per_h'], '.2f'):>6} "
            f"{c['releases']:>4} {_f(c['delay_p50_s'], '.3f'):>6} "
            f"{_f(c['delay_p95_s'], '.3f'):>6} {c['duration_s']:>7.1f}"
        )
        for lb in c["missed"]:
            lines.append(
                f"    missed {lb['remote']} {lb['start']:.3f}-{lb['end']:.3f} {lb['bytes']} B"
            )
        for u in c["false"]:
            lines.append(
                f"    false prompt {u['remote']} {u['host'] or '-'} "
                f"{u['start']:.3f}-{u['end']:.3f} {u['bytes']} B"
            )
    o = summary["overall"]
    lines.append(
        f"overall: recall {_f(o['recall_pct'], '.1f')} % ({o['detected']}/{o['labels']}), "
        f"leak {_f(o['leak_pct'], '.2f')} % ({o['leaked_bytes']}/{o['labelled_bytes']} B), "
        f"false prompts {o['false_prompts']} ({_f(o['false_prompts_per_h'], '.2f')}/h over "
        f"{o['hours']:.2f} h), release delay p50 {_f(o['delay_p50_s'], '.3f')} s "
        f"p95 {_f(o['delay_p95_s'], '.3f')} s ({o['releases']} releases)"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--shared",
        type=Path,
        default=DEFAULT_SHARED,
        help="the shared folder holding captures/labels.toml (default: %(default)s)",
    )
    ap.add_argument("--mode", choices=("strict", "followups"), default="strict")
    ap.add_argument("--json", action="store_true", help="print the numbers as JSON")
    ap.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target is missed (strict: recall < 100 %%, leak > 0.1 %%, "
        "false prompts > 0.5/h, p95 release delay > 0.3 s)",
    )
    ap.add_argument("--only", metavar="TEXT", help="only captures whose file name contains TEXT")
    ap.add_argument(
        "--shape-only",
        action="store_true",
        help="evaluate shape-only copies instead (payloads zeroed, no SYNs, clocks from 0, "
        "neutral names: "
        "bench/shape_only.py), written to a temporary directory",
    )
    ap.add_argument(
        "--synthetic",
        type=int,
        metavar="SEED",
        nargs="?",
        const=1,
        help="also evaluate hushsim.synth's session for SEED (default 1)",
    )
    args = ap.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="hushgate-eval-") as tmp:
            shared = args.shared
            if args.shape_only:
                if str(REPO) not in sys.path:
                    sys.path.insert(0, str(REPO))
                from bench.shape_only import write_shape_only

                shared = Path(tmp) / "shape-only"
                labels = write_shape_only(args.shared, shared)
            else:
                labels = load_labels(shared)
            captures = [c for c in labels
                        if not args.only or args.only in c.get("original", c["file"])]
            results = run(captures, shared, args.mode)
            if args.synthetic is not None:
                results.append(run_synthetic(args.mode, args.synthetic, Path(tmp)))
    except Exception as exc:  # noqa: BLE001 - one line, never a traceback
        print(f"eval_captures: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.mode == "followups":
        summary = evaluate_followups(results)
        failures = check_followups(summary)
    else:
        summary = evaluate(results)
        failures = check(summary)
    summary["failures"] = failures
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    if args.check and failures:
        print("check failed: " + "; ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
