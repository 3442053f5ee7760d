"""Headless Chromium driven through the DevTools protocol (a websocket; the `websockets`
package Prefect already brings): open a local page, wait for it to load, and report what a
person would see go wrong: images that did not load and console messages (errors, warnings,
uncaught exceptions, failed requests).

    with Chromium() as browser:
        page = browser.open(Path("report/index.html"))
    page.images   # [{"src": ..., "complete": True, "naturalWidth": 960}, ...]
    page.console  # ["error: ...", ...]; [] for a clean page
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def chromium_binary() -> str | None:
    """Debian's `chromium` (or another Chromium / Chrome on PATH), or None."""
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        found = shutil.which(name)
        if found:
            return found
    return None


@dataclass
class Page:
    url: str
    images: list[dict] = field(default_factory=list)
    console: list[str] = field(default_factory=list)
    title: str = ""


#: the page's images as the browser sees them, after the load event
IMAGES_JS = """JSON.stringify(Array.from(document.images).map(i => ({
    src: i.getAttribute('src'), complete: i.complete, naturalWidth: i.naturalWidth,
    naturalHeight: i.naturalHeight})))"""


class Chromium:
    """A headless Chromium with a fresh profile, its DevTools port read from the profile's
    DevToolsActivePort file; stopped (and the profile removed) on exit."""

    def __init__(self, binary: str | None = None, timeout: float = 60.0):
        self.binary = binary or chromium_binary()
        if self.binary is None:
            raise FileNotFoundError("no chromium on PATH (Debian: apt-get install chromium)")
        self.timeout = timeout
        self._ids = itertools.count(1)

    def __enter__(self) -> Chromium:
        self.profile = Path(tempfile.mkdtemp(prefix="flywheel-chromium-"))
        self.log = (self.profile / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [self.binary, "--headless=new", "--remote-debugging-port=0",
             f"--user-data-dir={self.profile}", "--no-sandbox", "--disable-gpu",
             "--no-first-run", "--no-default-browser-check", "--disable-extensions",
             "--disable-background-networking", "--disable-sync", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=self.log, stdin=subprocess.DEVNULL)
        try:
            self.ws_url = self._endpoint()
            from websockets.sync.client import connect

            self.ws = connect(self.ws_url, max_size=None, open_timeout=self.timeout)
        except BaseException:
            self._stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.ws.send(json.dumps({"id": next(self._ids), "method": "Browser.close"}))
            self.ws.close()
        except Exception:
            pass
        self._stop()

    def _stop(self) -> None:
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        shutil.rmtree(self.profile, ignore_errors=True)

    def _endpoint(self) -> str:
        """ws://127.0.0.1:PORT/devtools/browser/ID, from DevToolsActivePort."""
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited with {self.proc.returncode}: "
                                   + (self.profile / "stderr.log").read_text()[-2000:])
            lines = port_file.read_text().split() if port_file.is_file() else []
            if len(lines) >= 2:
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.1)
        raise TimeoutError(f"chromium wrote no {port_file} within {self.timeout}s")

    # -- the protocol ------------------------------------------------------------------------
    def _call(self, method: str, params: dict | None = None, session: str | None = None,
              events: list | None = None) -> dict:
        """Send one command and return its result; events that arrive meanwhile are kept in
        `events`."""
        msg_id = next(self._ids)
        msg = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        self.ws.send(json.dumps(msg))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if reply.get("id") == msg_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if events is not None and "method" in reply:
                events.append(reply)

    def _wait_for(self, method: str, events: list, session: str) -> None:
        """Read events until `method` arrives for `session` (all kept in `events`)."""
        if any(e["method"] == method and e.get("sessionId") == session for e in events):
            return
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            event = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if "method" in event:
                events.append(event)
                if event["method"] == method and event.get("sessionId") == session:
                    return
        raise TimeoutError(f"no {method} within {self.timeout}s")

    def open(self, path: Path, settle: float = 0.3) -> Page:
        """Load `path` (file://) in a new tab; return its images and console messages."""
        url = Path(path).resolve().as_uri()
        events: list[dict] = []
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True}
                             )["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self._call(f"{domain}.enable", session=session, events=events)
        self._call("Page.navigate", {"url": url}, session=session, events=events)
        self._wait_for("Page.loadEventFired", events, session)
        time.sleep(settle)  # late console messages
        result = self._call("Runtime.evaluate", {"expression": IMAGES_JS,
                                                 "returnByValue": True},
                            session=session, events=events)
        title = self._call("Runtime.evaluate", {"expression": "document.title",
                                                "returnByValue": True},
                           session=session, events=events)
        page = Page(url=url, images=json.loads(result["result"]["value"]),
                    title=title["result"]["value"])
        page.console = [m for e in events if e.get("sessionId") == session
                        for m in _console(e)]
        self._call("Target.closeTarget", {"targetId": target})
        return page


def _console(event: dict) -> list[str]:
    """What a person would see in the console: errors and warnings, uncaught exceptions and
    failed requests."""
    method, p = event["method"], event.get("params", {})
    if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "warning", "assert"):
        text = " ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", []))
        return [f"console.{p['type']}: {text}"]
    if method == "Runtime.exceptionThrown":
        d = p.get("exceptionDetails", {})
        return [f"exception: {d.get('text', '')} {d.get('exception', {}).get('description', '')}"]
    if method == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
        e = p["entry"]
        return [f"log.{e['level']}: {e.get('text', '')} {e.get('url', '')}".rstrip()]
    if method == "Network.loadingFailed":
        return [f"request failed: {p.get('errorText', '')} (request {p.get('requestId')})"]
    return []


def screenshot(page: Path, out: Path, width: int = 1280, height: int = 2400,
               binary: str | None = None) -> Path:
    """A PNG of `page` at width × height (chromium --headless --screenshot)."""
    binary = binary or chromium_binary()
    with tempfile.TemporaryDirectory(prefix="flywheel-chromium-") as profile:
        subprocess.run([binary, "--headless=new", "--no-sandbox", "--disable-gpu",
                        f"--user-data-dir={profile}", "--hide-scrollbars",
                        f"--screenshot={Path(out).resolve()}",
                        f"--window-size={width},{height}", Path(page).resolve().as_uri()],
                       check=True, capture_output=True, timeout=120)
    return Path(out)
