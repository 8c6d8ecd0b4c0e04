"""Headless Chromium driven over the DevTools protocol on a pipe: screenshots of a dashboard, and its tests.

    python -m cv_ray.dashboard.browser runs/tiny_cpu/dashboard/index.html --out overview.png
    python -m cv_ray.dashboard.browser "runs/tiny_cpu/dashboard/index.html#/traj/rl/2/0" --out traj.png --height 1400

Why the DevTools protocol over ``--remote-debugging-pipe`` (and not WebDriver or Playwright): it needs
nothing but Debian's ``chromium`` package (no chromedriver of a matching version, no Python package,
no browser download, no port), and it reports exactly what a page test must see: every console
message, every uncaught exception and every failed resource load (the ``Runtime`` and ``Log``
domains), a screenshot of a given size, and JavaScript evaluated in the page. Messages are JSON
objects ended by a NUL byte: commands go to the browser's fd 3, replies and events come from its fd 4.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import select
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome")


def find_chromium() -> str | None:
    """The browser binary (``$CV_RAY_CHROMIUM`` first), or None when none is installed."""
    override = os.environ.get("CV_RAY_CHROMIUM")
    if override:
        return override
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


class BrowserError(RuntimeError):
    pass


class Browser:
    """One headless Chromium with one page. ``problems`` collects console errors, uncaught exceptions
    and failed loads of the page, in order, as text."""

    def __init__(self, width: int = 1400, height: int = 900, binary: str | None = None, timeout_s: float = 30.0):
        binary = binary or find_chromium()
        if binary is None:
            raise BrowserError("no Chromium found: install Debian's `chromium` (bash tools/setup_env.sh does, as root)")
        self.timeout_s = timeout_s
        self._profile = tempfile.TemporaryDirectory(prefix="cv_ray_chromium_")
        to_browser_r, self._to_browser = os.pipe()
        self._from_browser, from_browser_w = os.pipe()
        args = [binary, "--headless=new", "--remote-debugging-pipe", "--no-first-run", "--no-default-browser-check",
                "--disable-gpu", "--disable-dev-shm-usage", "--disable-extensions", "--hide-scrollbars",
                "--mute-audio", f"--user-data-dir={self._profile.name}", f"--window-size={width},{height}"]
        if os.geteuid() == 0:
            args.append("--no-sandbox")  # Chromium refuses to start its sandbox as root (CI runs as root)
        # The browser reads commands from fd 3 and writes to fd 4: bash moves our pipe ends there in the
        # child (bash, not sh: dash's redirections take single-digit descriptors only).
        self._log = Path(self._profile.name) / "chromium.log"
        with self._log.open("wb") as log:
            self._proc = subprocess.Popen(
                ["bash", "-c", f'exec "$@" 3<&{to_browser_r} 4>&{from_browser_w}', "chromium", *args, "about:blank"],
                pass_fds=(to_browser_r, from_browser_w), stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self._events: list[dict[str, Any]] = []
        self.problems: list[str] = []
        self._session = None
        target = self._send("Target.createTarget", {"url": "about:blank"})["targetId"]
        self._session = self._send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")
        self.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height, "deviceScaleFactor": 1,
                                                         "mobile": False})

    # --------------------------------------------------------------------------------- protocol

    def _read_message(self, deadline: float) -> dict[str, Any]:
        while b"\0" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
                raise BrowserError(f"Chromium did not answer within {self.timeout_s} s")
            chunk = os.read(self._from_browser, 1 << 20)
            if not chunk:
                tail = self._log.read_text(errors="replace")[-2000:]
                raise BrowserError(f"Chromium closed the pipe (exit code {self._proc.poll()}); its output:\n{tail}")
            self._buffer += chunk
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def _note(self, event: dict[str, Any]) -> None:
        """Record what a page test must fail on."""
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text", "")
            self.problems.append(f"uncaught exception: {text}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", []))
            self.problems.append(f"console.{params['type']}: {args}")
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            entry = params["entry"]
            self.problems.append(f"{entry.get('source')}: {entry.get('text')} {entry.get('url', '')}".strip())

    def _send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if self._session is not None:
            message["sessionId"] = self._session
        os.write(self._to_browser, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + self.timeout_s
        while True:
            reply = self._read_message(deadline)
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise BrowserError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                self._note(reply)
                self._events.append(reply)

    def send(self, method: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A DevTools command to the page; returns its result."""
        return self._send(method, params)

    def wait_event(self, method: str) -> dict[str, Any]:
        """The next event ``method`` (one already received counts), waiting up to the timeout."""
        for i, event in enumerate(self._events):
            if event.get("method") == method:
                return self._events.pop(i)
        deadline = time.monotonic() + self.timeout_s
        while True:
            message = self._read_message(deadline)
            if "method" in message:
                self._note(message)
                if message["method"] == method:
                    return message
                self._events.append(message)

    # ------------------------------------------------------------------------------------- page

    def open(self, url: str) -> None:
        """Load ``url`` as a fresh document and wait for its load event (through about:blank: a change of
        the fragment alone would not load the page again)."""
        for target in ("about:blank", url):
            self._events = [e for e in self._events if e.get("method") != "Page.loadEventFired"]
            result = self.send("Page.navigate", {"url": target})
            if result.get("errorText"):
                raise BrowserError(f"cannot open {target}: {result['errorText']}")
            self.wait_event("Page.loadEventFired")

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises are awaited)."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True,
                                                "timeout": self.timeout_s * 1000})
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            raise BrowserError(f"{expression[:80]}: {details.get('exception', {}).get('description', details)}")
        return result["result"].get("value")

    def wait_for(self, condition: str) -> Any:
        """Wait, inside the page, until the JavaScript expression ``condition`` is truthy; returns its value."""
        return self.evaluate(f"""new Promise((resolve, reject) => {{
            const deadline = Date.now() + {int(self.timeout_s * 1000)};
            const check = () => {{
                let value; try {{ value = ({condition}); }} catch (e) {{ value = undefined; }}
                if (value) resolve(value);
                else if (Date.now() > deadline) reject(new Error("timed out waiting for: " + {json.dumps(condition)}));
                else requestAnimationFrame(check);
            }};
            check();
        }})""")

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params: dict[str, Any] = {"format": "png"}
        if full_page:  # from the top, so that sticky elements sit where a reader sees them first
            width, height = self.evaluate("window.scrollTo(0, 0); [document.documentElement.scrollWidth, "
                                          "document.documentElement.scrollHeight]")
            params.update(captureBeyondViewport=True, clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", params)["data"]))
        return path

    def close(self) -> None:
        if self._proc.poll() is None:
            # Not through _send: the browser may exit before it answers.
            os.write(self._to_browser, json.dumps({"id": self._next_id + 1, "method": "Browser.close"}).encode() + b"\0")
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        for fd in (self._to_browser, self._from_browser):
            os.close(fd)
        self._profile.cleanup()

    def __enter__(self) -> Browser:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("page", help="an HTML file (a fragment such as #/step/rl/2 may follow) or a URL")
    parser.add_argument("--out", required=True, type=Path, help="PNG file to write")
    parser.add_argument("--width", type=int, default=1400)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--full-page", action="store_true", help="capture the whole page, not just the window")
    args = parser.parse_args()
    page, _, fragment = args.page.partition("#")
    url = page if "://" in page else Path(page).resolve().as_uri()
    with Browser(args.width, args.height) as browser:
        browser.open(url + (f"#{fragment}" if fragment else ""))
        browser.wait_for("document.body.dataset.rendered")
        browser.screenshot(args.out, full_page=args.full_page)
        for problem in browser.problems:
            print("page problem:", problem)
    print(args.out)


if __name__ == "__main__":
    main()
