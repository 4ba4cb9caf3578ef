"""Policy vocabulary and the pure decisions of section 6 of the design.

Rules of this module: every value that crosses the control socket, the JSON output, the store or a
rules file is a string Enum defined here, once. Functions are pure: callers pass `now`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum


class Mode(str, Enum):
    STRICT = "strict"  # every upload waits for a decision
    FOLLOWUPS = "followups"  # first turn passes, follow-up turns and long turns wait
    MONITOR = "monitor"  # nothing held; uploads logged as if they were
    OFF = "off"  # not inspected at all


class CategoryAction(str, Enum):
    ALLOW = "allow"  # decided for the flow's lifetime: fast path in the kernel
    BLOCK = "block"  # rejected for the flow's lifetime
    INSPECT = "inspect"  # bursts are watched, uploads held


class UploadAction(str, Enum):
    """What the mode does with a detected upload (the `action` of `analyze --json`)."""

    HOLD = "hold"
    PASS = "pass"
    BLOCK = "block"
    MONITOR = "monitor"


class Outcome(str, Enum):
    """One list of upload outcomes everywhere: metrics, audit log, `hushgate log`."""

    APPROVED = "approved"  # a person allowed it
    DENIED = "denied"  # a person denied it
    EXPIRED = "expired"  # nobody answered within hold_timeout_s: a deny, scope once
    WINDOW = "window"  # an allow window let it pass
    QUIET = "quiet"  # a quiet window denied it at once
    RULE = "rule"  # an always-rule (allow or deny) decided it
    MONITORED = "monitored"  # monitor mode: logged, not held
    CAPPED = "capped"  # held memory hit a cap: denied, fail-closed
    LOST = "lost"  # pending when the guard restarted: reset, nothing delivered


# `hushgate log` also lists refused connection attempts of a blocked category (a messaging or
# calling host): they are not uploads, so not an Outcome (metrics count them as blocked flows).
BLOCKED = "blocked"
LOG_OUTCOMES = (*(o.value for o in Outcome), BLOCKED)

DENYING_OUTCOMES = frozenset(
    {Outcome.DENIED, Outcome.EXPIRED, Outcome.QUIET, Outcome.CAPPED, Outcome.LOST}
)


class Verb(str, Enum):
    ALLOW = "allow"
    DENY = "deny"


class Scope(str, Enum):
    ONCE = "once"  # this upload only
    FOR = "for"  # device + category for a duration (a window)
    ALWAYS = "always"  # a persisted rule


@dataclass(frozen=True, slots=True)
class Decision:
    """A decision about one pending upload."""

    verb: Verb
    scope: Scope = Scope.ONCE
    duration_s: float | None = None  # with Scope.FOR
    by: str = "cli"  # who decided: "cli:uid", "web", "watch", "rule:3", "expiry", ...


# Who decided, as a short channel (`via` in `log`, hooks and replies). The first word of a
# control request's `by` when it is one of the people's channels; the engine's own decisions use
# the rest.
CHANNELS = ("cli", "web", "watch", "mqtt", "ntfy", "expiry", "window", "rule", "quiet",
            "followups", "monitor", "cap", "restart", "lost", "other")
_ENGINE_BY = {"quiet window": "quiet", "connection reset": "lost", "monitored": "monitor"}


def channel(by: str | None) -> str:
    """`cli:alice (uid 1000)` -> `cli`; `quiet window` -> `quiet`; anything unknown -> `other`."""
    text = (by or "").strip().lower()
    if text in _ENGINE_BY:
        return _ENGINE_BY[text]
    word = re.split(r"[:\s(]", text, maxsplit=1)[0]
    return word if word in CHANNELS else "other"


class WindowKind(str, Enum):
    ALLOW = "allow"  # uploads pass, logged (outcome window)
    QUIET = "quiet"  # uploads denied at once, no prompt (outcome quiet)


@dataclass(frozen=True, slots=True)
class Window:
    """A standing, time-bounded decision for a device (optionally one category)."""

    device: str
    kind: WindowKind
    until: float
    category: str | None = None
    id: int = 0

    def active(self, now: float) -> bool:
        return now < self.until


@dataclass(frozen=True, slots=True)
class StandingRule:
    """An always-rule: allow or deny a device's uploads to a host (or a whole category)."""

    device: str
    verb: Verb
    host: str | None = None
    category: str | None = None
    id: int = 0

    def matches(self, device: str, host: str | None, category: str) -> bool:
        if self.device not in (device, "*"):
            return False
        if self.host is not None:
            return host is not None and host == self.host
        if self.category is not None:
            return category == self.category
        return True


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
_UNIT_S = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """`90s`, `30m`, `2h`, `1d` or plain seconds -> seconds. Raises ValueError."""
    match = _DURATION.match(text or "")
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 30m, 2h)")
    value = float(match.group(1)) * _UNIT_S[match.group(2)]
    if value <= 0:
        raise ValueError(f"duration must be positive: {text!r}")
    return value


# Windows (allow windows, mutes, `--for` answers) last from one second to thirty days.
MIN_DURATION_S = 1.0
MAX_DURATION_S = 30 * 86400.0


def check_window_duration(seconds: float, text: str | None = None) -> float:
    """`seconds` when it is a window's duration (1 s to 30 d), else ValueError naming the bound."""
    shown = text if text else format_duration(seconds)
    try:
        seconds = float(seconds)
    except (TypeError, ValueError):
        raise ValueError(f"not a duration: {text or seconds!r}") from None
    if not seconds >= MIN_DURATION_S:  # NaN too
        raise ValueError(f"duration {shown} is below the minimum of 1s (windows last 1s to 30d; "
                         "to lift a mute, `hushgate unmute --device NAME`)")
    if seconds > MAX_DURATION_S:
        raise ValueError(f"duration {shown} is above the maximum of 30d (windows last 1s to 30d; "
                         "for good, answer with --always)")
    return seconds


def standing_for(decision: Decision, device: str, host: str | None, category: str,
                 now: float) -> Window | StandingRule | None:
    """What a decision's scope leaves behind, worked out in this one place: `for` opens a window
    on the device's uploads of this category, `always` makes a rule for this host (for the
    category when the host is unknown), `once` nothing."""
    if decision.scope is Scope.FOR and decision.duration_s:
        kind = WindowKind.ALLOW if decision.verb is Verb.ALLOW else WindowKind.QUIET
        return Window(device, kind, now + float(decision.duration_s), category)
    if decision.scope is Scope.ALWAYS:
        return StandingRule(device, decision.verb, host=host,
                            category=None if host else category)
    return None


def supersedes(new: Window, old: Window) -> bool:
    """A new window ends the device's windows of the other kind that it overlaps (either is
    device-wide, or both are for the same category): allowing after a mute lifts the mute, and
    muting after an allow window ends the allow window. Same-kind windows just overlap."""
    return (old.device == new.device and old.kind is not new.kind
            and (old.category is None or new.category is None or old.category == new.category))


def format_duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def standing_decision(
    device: str,
    host: str | None,
    category: str,
    now: float,
    windows: tuple[Window, ...],
    rules: tuple[StandingRule, ...],
) -> tuple[Outcome, Verb] | None:
    """What a standing decision says about a new upload, if anything.

    Deny beats allow (OpenSnitch's lesson): a quiet window or a deny rule wins over an allow
    window or an allow rule that also matches.
    """
    found: list[tuple[Outcome, Verb]] = []
    for window in windows:
        if window.device != device or not window.active(now):
            continue
        if window.category is not None and window.category != category:
            continue
        found.append(
            (Outcome.QUIET, Verb.DENY) if window.kind is WindowKind.QUIET
            else (Outcome.WINDOW, Verb.ALLOW)
        )
    for rule in rules:
        if rule.matches(device, host, category):
            found.append((Outcome.RULE, rule.verb))
    if not found:
        return None
    for item in found:
        if item[1] is Verb.DENY:
            return item
    return found[0]
