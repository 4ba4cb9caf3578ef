"""A headless Chromium that manages the live guard from its web page: run by
tests/e2e/test_manage_browser_live.py inside the topology's unguarded LAN host
(`ip netns exec <lan-ns> python THIS ...`), so the browser reaches the router's page over the
simulated LAN exactly as a phone would.

Protocol: the login token is the first line of stdin (never on a command line); after it, one JSON
command per line, each answered by one JSON line on stdout (flushed at once):
  {"do": "answer", "action": A}        wait for a card not seen before, press its A button
                                       (allow-once, allow-10min, allow-always, deny, deny-always...),
                                       wait for it to leave the list
  {"do": "mute", "device": D, "seconds": S}   the device card's Mute (for S seconds)
  {"do": "unmute", "device": D}        its Unmute
  {"do": "mode", "device": D, "mode": M, "expect": E}   choose mode M; E is what it then shows
  {"do": "revoke", "kind": K, "device": D}    the Revoke button of D's K entry on the Rules tab
  {"do": "rules"} / {"do": "devices"}  what those tabs show
  {"do": "log", "outcome": O, "text": T}      filter the log; the entries shown
  {"do": "viewport", "width": W, "height": H, "scale": F, "mobile": bool}
  {"do": "shot", "tab": T, "path": P}  that tab (or every section on a wide screen), saved as PNG
  {"do": "quit"}
Answers: {"event": "ok", "do": ..., ...} or {"event": "error", "message": ..., "traceback": ...}.
The first line out is {"event": "signed_in"}. Every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.browser.chromium import chromium  # noqa: E402

WAIT_S = 10.0


def emit(event: str, **values: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **values}) + "\n")
    sys.stdout.flush()


def wait(predicate: Any, what: str, timeout_s: float = WAIT_S, poll_s: float = 0.03) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            value = predicate()
        except TimeoutError:
            raise
        except Exception:  # noqa: BLE001 - a list redrawn under our feet: ask again
            value = None
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


class Page:
    def __init__(self, driver: Any) -> None:
        self.d = driver
        self.seen: set[str] = set()

    def js(self, script: str, *args: Any) -> Any:
        return self.d.execute_script(script, *args)

    def visible(self, element_id: str) -> bool:
        # getClientRects: offsetParent is null for position: fixed (the tab bar) too
        return bool(self.js("const e = document.getElementById(arguments[0]);"
                            "return !!e && e.getClientRects().length > 0", element_id))

    def tab(self, name: str) -> None:
        """Show a section: its tab on a phone; on a wide screen every section is shown."""
        if self.visible("tabs"):
            self.js("document.getElementById(arguments[0]).click()", f"tab-{name}")
        wait(lambda: self.visible(f"panel-{name}"), f"the {name} section")

    def press(self, css: str, what: str) -> None:
        def go() -> bool:
            return bool(self.js("const b = document.querySelector(arguments[0]);"
                                "if (!b || b.disabled || !b.getClientRects().length) return false;"
                                "b.scrollIntoView({block: 'center'}); b.click(); return true",
                                css))
        wait(go, what)

    def card_ids(self) -> list[str]:
        return list(self.js("return [...document.querySelectorAll('#pending li.card')]"
                            ".filter(e => e.offsetParent !== null).map(e => e.dataset.id)"))

    def device_text(self, device: str) -> str:
        return str(self.js("const e = [...document.querySelectorAll('li.device-card')]"
                           ".find(e => e.dataset.device === arguments[0]);"
                           "return e ? e.innerText : ''", device))

    def rect(self, css: str) -> list[int]:
        """Where an element is drawn, in the screenshot's device pixels."""
        r = self.js("const e = document.querySelector(arguments[0]);"
                    "if (!e) return null; const r = e.getBoundingClientRect();"
                    "return [r.left, r.top, r.width, r.height, window.devicePixelRatio]", css)
        return [round(v * r[4]) for v in r[:4]] if r else []

    # -- the commands ---------------------------------------------------------------------------

    def answer(self, action: str, timeout_s: float = 20.0, shot: str | None = None) -> dict:
        self.tab("held")
        new = wait(lambda: [i for i in self.card_ids() if i not in self.seen],
                   "a new held upload", timeout_s)
        seen_at = time.time()
        card_id = new[0]
        self.seen.add(card_id)
        css = f'#pending li.card[data-id="{card_id}"]'
        card_text = self.js("return document.querySelector(arguments[0]).innerText", css)
        out: dict[str, Any] = {"id": card_id, "card_text": card_text, "seen_at": seen_at,
                               "title": self.d.title}
        if shot:
            Path(shot).parent.mkdir(parents=True, exist_ok=True)
            out["card_rect"] = self.rect(css)
            out["shot"] = shot if self.d.save_screenshot(shot) else None
        out["clicked_at"] = time.time()
        self.press(f'{css} button[data-action="{action}"]', f"the {action} button")
        wait(lambda: card_id not in self.card_ids(), f"card {card_id} to leave the list")
        out["gone_at"] = time.time()
        return out

    def mute(self, device: str, seconds: int) -> dict:
        self.tab("devices")
        card = f'li.device-card[data-device="{device}"]'
        wait(lambda: "Mute" in self.device_text(device), f"the card of {device}")
        self.js("const s = document.querySelector(arguments[0] + ' select.mute-for');"
                "s.value = arguments[1];", card, str(seconds))
        self.press(f'{card} button[data-action="mute"]', "the Mute button")
        text = wait(lambda: (t := self.device_text(device)) and "Muted until" in t and t,
                    f"{device} shown muted")
        return {"card_text": text}

    def unmute(self, device: str) -> dict:
        self.tab("devices")
        card = f'li.device-card[data-device="{device}"]'
        self.press(f'{card} button[data-action="unmute"]', "the Unmute button")
        text = wait(lambda: (t := self.device_text(device)) and "Muted until" not in t
                    and "MUTE FOR" in t.upper() and t, f"{device} shown not muted")
        return {"card_text": text}

    def mode(self, device: str, mode: str, expect: str) -> dict:
        """Choose `mode` in the device's select; wait until the redrawn card shows `expect`."""
        self.tab("devices")
        card = f'li.device-card[data-device="{device}"]'
        wait(lambda: self.js("return !!document.querySelector(arguments[0])", f"{card} select"),
             f"the mode of {device}")
        self.js("const s = document.querySelector(arguments[0] + ' select.mode');"
                "s.value = arguments[1]; s.dispatchEvent(new Event('change'));", card, mode)
        wait(lambda: self.js("const s = document.querySelector(arguments[0] + ' select.mode');"
                             "return !!s && !s.disabled && s.value === arguments[1]", card, expect),
             f"{device} shown in mode {expect}")
        return {"options": self.js("return [...document.querySelectorAll(arguments[0] + "
                                   "' select.mode option')].map(o => o.value)", card)}

    def rules(self) -> list[dict]:
        self.tab("rules")
        return list(self.js("return [...document.querySelectorAll('#rules li.rule')].map(e =>"
                            "({id: e.dataset.id, kind: e.dataset.kind, text: e.innerText}))"))

    def revoke(self, kind: str, device: str) -> dict:
        def find() -> Any:
            return next((r for r in self.rules() if r["kind"] == kind
                         and device in r["text"].split("\n")), None)
        entry = wait(find, f"the {kind} entry of {device}")
        self.press(f'#rules li.rule[data-id="{entry["id"]}"] button[data-action="revoke"]',
                   "the Revoke button")
        wait(lambda: all(r["id"] != entry["id"] for r in self.rules()),
             f"entry {entry['id']} to leave the list")
        return {"revoked": entry}

    def devices(self) -> list[dict]:
        self.tab("devices")
        return list(self.js("return [...document.querySelectorAll('li.device-card')].map(e =>"
                            "({device: e.dataset.device, text: e.innerText}))"))

    def log(self, outcome: str, text: str) -> dict:
        self.tab("log")
        self.js("const o = document.getElementById('f-outcome'); o.value = arguments[0];"
                "o.dispatchEvent(new Event('change'));"
                "const t = document.getElementById('f-text'); t.value = arguments[1];"
                "t.dispatchEvent(new Event('input'));", outcome, text)

        def entries() -> list[dict] | None:
            got = self.js("return [...document.querySelectorAll('#log li.entry')].map(e =>"
                          "({outcome: e.dataset.outcome, text: e.innerText}))")
            if got and all(e["outcome"] == outcome for e in got) if outcome else got:
                return got
            return None
        got = wait(entries, f"log entries with outcome {outcome!r}", 12.0)
        return {"entries": got, "filters": self.js(
            "return ['f-device', 'f-outcome', 'f-range', 'f-text']"
            ".map(i => document.getElementById(i).value)")}

    def viewport(self, width: int, height: int, scale: float, mobile: bool) -> dict:
        self.d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": width, "height": height, "deviceScaleFactor": scale, "mobile": mobile})
        time.sleep(0.3)
        return {"inner": self.js("return [innerWidth, innerHeight, devicePixelRatio]"),
                "scroll_width": self.js("return document.documentElement.scrollWidth")}

    def shot(self, tab: str, path: str) -> dict:
        self.tab(tab)
        self.js("window.scrollTo(0, 0)")
        time.sleep(0.4)  # the tab's list refreshes at once; let it draw
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        ok = self.d.save_screenshot(path)
        panels = {p: self.rect(f"#panel-{p}") if self.visible(f"panel-{p}") else []
                  for p in ("held", "devices", "rules", "log")}
        return {"path": path if ok else None, "panels": panels, "tabs": self.rect("#tabs")
                if self.visible("tabs") else [],
                "inner": self.js("return [innerWidth, innerHeight, devicePixelRatio]"),
                "scroll_width": self.js("return document.documentElement.scrollWidth")}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument("--width", type=int, default=390)
    ap.add_argument("--height", type=int, default=844)
    ap.add_argument("--scale", type=float, default=1.0)
    args = ap.parse_args()
    token = sys.stdin.readline().strip()
    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        with chromium(args.workdir, width=args.width, height=args.height,
                      scale=args.scale) as driver:
            driver.get(args.url)
            page = Page(driver)
            wait(lambda: page.visible("secret"), "the sign-in form", 15.0)
            page.js("document.getElementById('secret').value = arguments[0];"
                    "document.querySelector('#login-form button[type=submit]').click()", token)
            wait(lambda: page.visible("empty"), "the empty list after signing in", 15.0)
            page.seen.update(page.card_ids())
            emit("signed_in", t=time.time())
            for line in sys.stdin:
                cmd = json.loads(line)
                do = cmd.pop("do")
                if do == "quit":
                    emit("ok", do=do)
                    break
                try:
                    result = getattr(page, do)(**cmd)
                except Exception as exc:  # noqa: BLE001 - reported, the test decides
                    emit("error", do=do, message=f"{type(exc).__name__}: {exc}",
                         traceback=traceback.format_exc()[-3000:],
                         page=driver.execute_script("return document.body.innerText")[-3000:])
                    continue
                emit("ok", do=do, result=result)
    except Exception as exc:  # noqa: BLE001 - reported to the test as one event
        emit("error", message=f"{type(exc).__name__}: {exc}",
             traceback=traceback.format_exc()[-3000:])
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
