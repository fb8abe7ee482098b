"""A headless Chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe: it reads commands on
file descriptor 3 and answers on 4, NUL-terminated JSON), with the standard library only: open a page, see every
request it makes, run a script in it, take a screenshot. Every wait is bounded; the browser runs in a session of
its own, with a profile folder of its own, and closing it kills its whole process group.

    python -m tests.browser URL OUT.png [ELEMENT_ID]   # a 1200x900 screenshot (.png or .jpg), scrolled to the element
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

TIMEOUT_S = 60  # for any one answer; a loaded 2-core machine starts Chromium in seconds


def find_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


class Browser:
    def __init__(self, executable: str):
        self.profile = tempfile.mkdtemp(prefix="afine-chromium-")
        commands, self.send_fd = os.pipe()  # we write commands, it reads them on fd 3
        self.receive_fd, answers = os.pipe()  # it answers on fd 4

        def descriptors():  # in the child, before exec: its pipe ends at 3 and 4, inherited
            read, write = os.dup(commands), os.dup(answers)
            os.dup2(read, 3)
            os.dup2(write, 4)
            os.set_inheritable(3, True)
            os.set_inheritable(4, True)

        self.process = subprocess.Popen(
            [executable, "--headless", "--disable-gpu", "--no-sandbox", "--remote-debugging-pipe", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-default-apps", "--mute-audio", f"--user-data-dir={self.profile}", "about:blank"],
            preexec_fn=descriptors, close_fds=False, start_new_session=True, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(commands)
        os.close(answers)
        self.buffer, self.next_id, self.events = b"", 0, []
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        self.session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Network.enable", session=True)
        self.call("Page.enable", session=True)

    def send(self, method: str, params: dict | None = None, session: bool = False) -> int:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = self.session
        os.write(self.send_fd, json.dumps(message).encode() + b"\0")
        return self.next_id

    def wait(self, done) -> dict:
        """Messages until one for which done(message) holds (events kept in self.events)."""
        end = time.monotonic() + TIMEOUT_S
        while True:
            while b"\0" in self.buffer:
                raw, self.buffer = self.buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "method" in message:
                    self.events.append(message)
                if done(message):
                    return message
            ready, _, _ = select.select([self.receive_fd], [], [], max(0.0, end - time.monotonic()))
            if not ready:
                raise TimeoutError("chromium did not answer")
            chunk = os.read(self.receive_fd, 1 << 20)
            if not chunk:
                raise EOFError("chromium closed the pipe")
            self.buffer += chunk

    def call(self, method: str, params: dict | None = None, session: bool = False) -> dict:
        i = self.send(method, params, session)
        answer = self.wait(lambda m: m.get("id") == i)
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def open(self, url: str) -> None:
        """Load `url` and wait for its load event (scripts run, images loaded)."""
        self.events.clear()
        self.send("Page.navigate", {"url": url}, session=True)
        self.wait(lambda m: m.get("method") == "Page.loadEventFired")

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def screenshot(self, url: str, out: str, element: str | None = None, size: tuple[int, int] = (1200, 900)) -> None:
        """A PNG (or JPEG, by the suffix of `out`) of the page's window at `size`, scrolled to the element of id
        `element` if given."""
        self.call("Emulation.setDeviceMetricsOverride", {"width": size[0], "height": size[1], "deviceScaleFactor": 1,
                                                         "mobile": False}, session=True)
        self.open(url)
        if element:
            self.evaluate(f"document.getElementById({json.dumps(element)}).scrollIntoView()")
        jpeg = out.lower().endswith((".jpg", ".jpeg"))
        shot = self.call("Page.captureScreenshot", {"format": "jpeg", "quality": 85} if jpeg else {"format": "png"},
                         session=True)
        with open(out, "wb") as f:
            f.write(base64.b64decode(shot["data"]))

    def requests(self) -> list[str]:
        """The URLs the page asked for since it was opened."""
        return [e["params"]["request"]["url"] for e in self.events if e.get("method") == "Network.requestWillBeSent"]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close")
                    self.process.wait(timeout=10)
                except (OSError, subprocess.TimeoutExpired):
                    pass
        finally:
            if self.process.poll() is None or self.alive():
                try:
                    os.killpg(self.process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.process.wait(timeout=10)
            os.close(self.send_fd)
            os.close(self.receive_fd)
            shutil.rmtree(self.profile, ignore_errors=True)

    def alive(self) -> bool:
        """Whether any process of the browser's group is left."""
        try:
            os.killpg(self.process.pid, 0)
            return True
        except (ProcessLookupError, PermissionError):
            return False


if __name__ == "__main__":
    browser = Browser(find_chromium() or sys.exit("error: chromium is not installed"))
    try:
        browser.screenshot(sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    finally:
        browser.close()
