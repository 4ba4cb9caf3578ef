"""A headless Chromium that answers the live web prompt: run by tests/e2e/test_prompts_live.py
inside the topology's unguarded LAN host (`ip netns exec <lan-ns> python THIS ...`), so the
browser reaches the router's web prompt over the simulated LAN exactly as a phone would.

Protocol: the login token is the first line of stdin (never on a command line). Events are JSON
lines on stdout, flushed at once; the test reads them as they come:
  {"event": "signed_in", "t": ...}                 the list is showing, nothing held yet
  {"event": "decided", "round": k, "id": ..., "action": ..., "seen_at": ..., ...}
                                                   a card appeared (without a reload), was clicked
                                                   and left the list
  {"event": "done"} and exit 0; or {"event": "error", "message": ...} and exit 1.
Each round waits for a card whose id was not seen before; the test starts the upload of round k
after it read the event of round k-1 (or "signed_in"). Every wait is bounded.
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

from tests.browser.chromium import FLAGS, chromium  # noqa: E402

ACTIONS = {"allow": "allow-once", "deny": "deny", "allow-30min": "allow-30min"}


def emit(event: str, **values: Any) -> None:
    sys.stdout.write(json.dumps({"event": event, **values}) + "\n")
    sys.stdout.flush()


def wait(predicate: Any, what: str, timeout_s: float, poll_s: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(poll_s)


def visible(driver: Any, element_id: str) -> Any:
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.common.by import By

    try:
        element = driver.find_element(By.ID, element_id)
        return element if element.is_displayed() else None
    except (NoSuchElementException, StaleElementReferenceException):
        return None


def card_ids(driver: Any) -> list[str]:
    """The data-id of every card on the page, read in one step."""
    return list(
        driver.execute_script(
            "return [...document.querySelectorAll('#pending li.card')]"
            ".filter(e => e.offsetParent !== null).map(e => e.dataset.id)"
        )
    )


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--workdir", required=True, type=Path)
    ap.add_argument(
        "--action",
        action="append",
        choices=sorted(ACTIONS),
        required=True,
        help="one round per --action, in order",
    )
    ap.add_argument("--screenshot", type=Path, help="saved when the first card is showing")
    ap.add_argument("--ignore-certificate-errors", action="store_true")
    ap.add_argument("--round-timeout", type=float, default=20.0)
    args = ap.parse_args()
    token = sys.stdin.readline().strip()

    if args.ignore_certificate_errors and "--ignore-certificate-errors" not in FLAGS:
        import tests.browser.chromium as chromium_mod

        # The self-signed certificate: the test checks its fingerprint separately, as a phone's
        # owner would; the flag only lets the page load.
        setattr(chromium_mod, "FLAGS", (*FLAGS, "--ignore-certificate-errors"))  # noqa: B010

    from selenium.webdriver.common.by import By

    args.workdir.mkdir(parents=True, exist_ok=True)
    try:
        with chromium(args.workdir) as driver:
            driver.get(args.url)
            secret = wait(lambda: visible(driver, "secret"), "the sign-in form", 15.0)
            secret.send_keys(token)
            driver.find_element(By.CSS_SELECTOR, "#login-form button[type=submit]").click()
            wait(lambda: visible(driver, "empty"), "the empty list after signing in", 15.0)
            # A marker that a reload would wipe: the card must come without one.
            driver.execute_script("window.__hgNoReload = 'still-here';")
            seen: set[str] = set(card_ids(driver))
            emit("signed_in", t=time.time(), cards=sorted(seen))
            for k, action in enumerate(args.action, start=1):
                new = wait(
                    lambda: [i for i in card_ids(driver) if i not in seen],
                    f"the card of round {k}",
                    args.round_timeout,
                )
                seen_at = time.time()
                card_id = new[0]
                seen.add(card_id)
                card = driver.find_element(By.CSS_SELECTOR, f'li.card[data-id="{card_id}"]')
                marker = driver.execute_script("return window.__hgNoReload || null")
                card_text = card.text
                page_text = driver.execute_script("return document.body.innerText")
                title = driver.title
                # where the card is drawn, in the screenshot's device pixels
                rect = driver.execute_script(
                    "const r = arguments[0].getBoundingClientRect();"
                    "return [r.left, r.top, r.width, r.height, window.devicePixelRatio];",
                    card,
                )
                shot = None
                if args.screenshot is not None and k == 1:
                    args.screenshot.parent.mkdir(parents=True, exist_ok=True)
                    shot = (
                        str(args.screenshot)
                        if driver.save_screenshot(str(args.screenshot))
                        else None
                    )
                buttons = card.find_elements(
                    By.CSS_SELECTOR, f'button[data-action="{ACTIONS[action]}"]'
                )
                if len(buttons) != 1:
                    raise RuntimeError(
                        f"card {card_id}: {len(buttons)} {ACTIONS[action]!r} buttons"
                    )
                clicked_at = time.time()
                buttons[0].click()
                wait(
                    lambda c=card_id: c not in card_ids(driver),
                    f"card {card_id} to leave the list",
                    10.0,
                )
                gone_at = time.time()
                emit(
                    "decided",
                    round=k,
                    id=card_id,
                    action=action,
                    seen_at=seen_at,
                    clicked_at=clicked_at,
                    gone_at=gone_at,
                    card_text=card_text,
                    page_text=page_text,
                    title=title,
                    no_reload_marker=marker,
                    screenshot=shot,
                    card_rect=[round(v * rect[4]) for v in rect[:4]],
                    url=driver.current_url,
                )
            emit("done")
    except Exception as exc:  # noqa: BLE001 - reported to the test as one event
        emit(
            "error",
            message=f"{type(exc).__name__}: {exc}",
            traceback=traceback.format_exc()[-3000:],
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
