"""The web console (issue #19) in a real headless Chromium, against a real `ccx serve`.

Rules: servers bind 127.0.0.1 on port 0 (the port is read from the "listening" log line);
Chromium and chromedriver are Debian's (`.ci/chromium` installs them), driven by Selenium;
every wait is on a DOM condition (WebDriverWait) or on ccx's own answers, never a fixed
sleep (one test observes, for a bounded time, that output does *not* arrive while paused:
an absence has no event to wait for). Screenshots of every view go to a temporary
directory whose path is printed at the end of the run. Other clients (the "owner" of a
session the browser only watches) are plain `websockets` clients.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.common.exceptions import WebDriverException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
except ImportError:  # pragma: no cover - depends on the machine
    webdriver = None

if webdriver is None or CHROMIUM is None or CHROMEDRIVER is None:
    pytest.skip("console tests need chromium, chromedriver (.ci/chromium) and selenium",
                allow_module_level=True)

from websockets.sync.client import connect as ws_connect  # noqa: E402

CCX = str(Path(sys.executable).with_name("ccx"))
PY = sys.executable
WAIT_S = 20
TOKEN = "s3cret-console-token"


class Serve:
    """A `ccx serve` process on 127.0.0.1 and an ephemeral port."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [CCX, "serve", "--port", "0", "--kill-grace", "1", *args],
            stderr=subprocess.PIPE, env={**os.environ, "CCX_LOG_FORMAT": "json", **(env or {})})
        assert self.proc.stderr is not None
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                break
            event = json.loads(line)
            if event.get("event") == "listening":
                self.port = int(event["port"])
                break
        else:
            self.proc.kill()
            raise AssertionError("ccx serve did not start")
        # Keep draining its log so the server never blocks on a full pipe.
        self.drain = subprocess.Popen(["cat"], stdin=self.proc.stderr,
                                      stdout=subprocess.DEVNULL)
        self.page = f"http://127.0.0.1:{self.port}/"
        self.ws_url = f"ws://127.0.0.1:{self.port}/ws"

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        assert self.proc.wait(timeout=15) == 0
        self.drain.wait(timeout=5)


class Client:
    """A synchronous JSON-RPC client: the "other" client in these tests."""

    def __init__(self, url: str, token: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else None
        self.stack = contextlib.ExitStack()
        self.ws = self.stack.enter_context(
            ws_connect(url, additional_headers=headers, max_size=None))
        self.next_id = 0
        self.notifications: list[dict[str, Any]] = []

    def request(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        self.ws.send(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                 "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=WAIT_S))
            if "method" in message:
                self.notifications.append(message)
            elif message.get("id") == self.next_id:
                assert "result" in message, message
                return message["result"]  # type: ignore[no-any-return]

    def until(self, method: str, session_id: str) -> dict[str, Any]:
        """Read notifications until *method* of *session_id*; return its params."""
        for message in self.notifications:
            if message["method"] == method and message["params"]["session_id"] == session_id:
                return message["params"]  # type: ignore[no-any-return]
        while True:
            message = json.loads(self.ws.recv(timeout=WAIT_S))
            if "method" in message:
                self.notifications.append(message)
                if message["method"] == method and \
                        message["params"]["session_id"] == session_id:
                    return message["params"]  # type: ignore[no-any-return]

    def stdout(self, session_id: str) -> str:
        return "".join(m["params"]["data"] for m in self.notifications
                       if m["method"] == "process.output"
                       and m["params"]["session_id"] == session_id
                       and m["params"]["stream"] == "stdout")

    def close(self) -> None:
        self.stack.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory: pytest.TempPathFactory,
          request: pytest.FixtureRequest) -> Iterator[Path]:
    directory = tmp_path_factory.mktemp("console-screenshots")
    yield directory
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled() if capture else contextlib.nullcontext():
        print(f"\nconsole screenshots: {directory}", flush=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                     "--disable-gpu", "--window-size=1280,860", "--lang=en-US"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    try:
        driver = webdriver.Chrome(options=options, service=service)
    except WebDriverException as exc:
        pytest.skip(f"chromium would not start: {exc.msg}")
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def server() -> Iterator[Serve]:
    serve = Serve()
    try:
        yield serve
    finally:
        serve.stop()


def wait(driver: Any, condition: Any, timeout: float = WAIT_S) -> Any:
    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(
        lambda d: condition(d) or None)


def text(driver: Any, element_id: str) -> str:
    return str(driver.find_element(By.ID, element_id).text)


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def csp_errors(driver: Any) -> list[str]:
    return [entry["message"] for entry in driver.get_log("browser")
            if "Content Security Policy" in entry["message"]]


def open_console(driver: Any, server: Serve) -> None:
    driver.get(server.page)
    wait(driver, lambda d: text(d, "conn") == "connected")


# The list is re-rendered every second: rows are read, and clicked, in one script each, so
# no element reference goes stale between finding and using it.
ROWS = ("return [...document.querySelectorAll('#sessions tbody tr')]"
        ".map(r => [r.dataset.id, r.innerText])")
CLICK_ROW = ("const row = document.querySelector(`tr[data-id=\"${arguments[0]}\"]`);"
             "if (row) row.click(); return Boolean(row);")


def open_session(driver: Any, session_id: str) -> None:
    wait(driver, lambda d: js(d, CLICK_ROW, session_id))
    wait(driver, lambda d: d.find_element(By.ID, "session-view").is_displayed())


def log_text(driver: Any, stream: str = "stdout") -> str:
    return str(js(driver, "return [...document.querySelectorAll('#sv-log .out-' + arguments[0])]"
                          ".map(s => s.textContent).join('')", stream))


def terminal_text(driver: Any) -> str:
    return str(js(driver, "return document.querySelector('#sv-term .xterm-rows')?.innerText"
                          " || ''"))


def status(driver: Any) -> str:
    return text(driver, "sv-status")


def test_page_is_served_with_a_strict_csp(server: Serve) -> None:
    import urllib.request

    with urllib.request.urlopen(server.page + "ui/") as response:
        policy = response.headers["Content-Security-Policy"]
        body = response.read().decode()
    assert "script-src 'self'" in policy and "unsafe-inline" not in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    nonce = policy.split("'nonce-", 1)[1].split("'", 1)[0]
    assert f'nonce="{nonce}"' in body and "<script>" not in body and "style=" not in body


def test_list_shows_sessions_from_cli_and_api(browser: Any, server: Serve, shots: Path) -> None:
    owner = Client(server.ws_url)
    api_id = owner.request("execute", command=[PY, "-c", "import time; time.sleep(60)"],
                           tag="from-api")["session_id"]
    cli = subprocess.Popen([CCX, "run", "--tag", "from-cli", "--", PY, "-c",
                            "print('cli up', flush=True); import time; time.sleep(60)"],
                           env={**os.environ, "CCX_URL": server.ws_url},
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert cli.stdout is not None and cli.stdout.readline() == b"cli up\n"
        open_console(browser, server)
        rows = lambda d: dict(js(d, ROWS))  # noqa: E731
        wait(browser, lambda d: api_id in rows(d)
             and any("from-cli" in t for t in rows(d).values()))
        assert "running" in rows(browser)[api_id] and "from-api" in rows(browser)[api_id]
        assert "attached" in rows(browser)[api_id]
        browser.find_element(By.ID, "filter-tag").send_keys("from-cli")
        wait(browser, lambda d: len(rows(d)) == 1 and "from-cli" in next(iter(rows(d).values())))
        browser.save_screenshot(str(shots / "list.png"))
        browser.find_element(By.ID, "filter-tag").clear()
        browser.find_element(By.ID, "filter-tag").send_keys(Keys.BACKSPACE)
        wait(browser, lambda d: api_id in rows(d))
        from selenium.webdriver.support.select import Select

        Select(browser.find_element(By.ID, "filter-status")).select_by_visible_text("exited")
        wait(browser, lambda d: api_id not in rows(d)
             and all(t.startswith("exited") for t in rows(d).values()))
        Select(browser.find_element(By.ID, "filter-status")).select_by_index(0)
    finally:
        owner.request("control", session_id=api_id, type="CANCEL")
        owner.close()
        cli.send_signal(signal.SIGINT)
        cli.wait(timeout=15)
    assert not csp_errors(browser)


def test_pty_python_repl(browser: Any, server: Serve, shots: Path) -> None:
    open_console(browser, server)
    browser.find_element(By.ID, "start-command").send_keys("python3 -i")
    browser.find_element(By.ID, "start-pty").click()
    browser.find_element(By.ID, "start-tag").send_keys("repl")
    browser.find_element(By.ID, "start-submit").click()
    wait(browser, lambda d: ">>>" in terminal_text(d))
    assert status(browser) == "running"
    assert "owner" in text(browser, "sv-mode")
    browser.find_element(By.CSS_SELECTOR, "#sv-term .xterm-helper-textarea").send_keys(
        "print(6*7)" + Keys.ENTER)
    wait(browser, lambda d: "\n42\n" in terminal_text(d))
    browser.save_screenshot(str(shots / "pty.png"))
    # The terminal follows the browser window: the session's size is the view's.
    sid = js(browser, "return window.ccxConsole.view.id")
    size = lambda: js(browser, "const t = window.ccxConsole.view.terminal.term;"  # noqa: E731
                               "return [t.cols, t.rows]")
    with contextlib.closing(Client(server.ws_url)) as other:
        pty = lambda: list(other.request("status", session_id=sid)["pty"].values())  # noqa: E731
        wait(browser, lambda d: pty() == size() and size() != [100, 30])
        wide = size()
        browser.set_window_size(900, 700)
        wait(browser, lambda d: size()[0] < wide[0] and pty() == size())
        browser.set_window_size(1280, 860)
    browser.find_element(By.ID, "sv-cancel").click()
    wait(browser, lambda d: status(d) == "cancelled")
    assert "cancelled" in text(browser, "sv-final")
    assert not csp_errors(browser)


TICKER = ("import sys, time\n"
          "i = 0\n"
          "while True:\n"
          "    print(i, flush=True)\n"
          "    if i % 10 == 0: print('tick', i, file=sys.stderr, flush=True)\n"
          "    i += 1\n"
          "    time.sleep(0.05)\n")


def test_pause_resume_cancel_from_the_view(browser: Any, server: Serve, shots: Path) -> None:
    owner = Client(server.ws_url)
    sid = owner.request("execute", command=[PY, "-c", TICKER], tag="ticker")["session_id"]
    try:
        open_console(browser, server)
        open_session(browser, sid)
        assert "watching" in text(browser, "sv-mode")
        wait(browser, lambda d: len(log_text(d).split()) > 40 and log_text(d, "stderr"))
        browser.save_screenshot(str(shots / "log.png"))
        browser.find_element(By.ID, "sv-search").send_keys("tick 2")
        wait(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#sv-log .out-stderr.hit")
             and text(d, "sv-hits").endswith("match"))
        assert all("tick 2" in e.text for e in browser.find_elements(By.CSS_SELECTOR,
                                                                       "#sv-log .hit"))
        browser.find_element(By.ID, "sv-search").clear()
        browser.find_element(By.ID, "sv-pause").click()
        wait(browser, lambda d: status(d) == "paused")
        held = owner.request("status", session_id=sid)["stdout_bytes"]
        wait(browser, lambda d: len(log_text(d)) == held)  # all that was read is shown
        time.sleep(0.5)  # an absence: 10 ticks' worth of time, and nothing arrives
        assert len(log_text(browser)) == held
        assert owner.request("status", session_id=sid)["stdout_bytes"] == held
        browser.find_element(By.ID, "sv-resume").click()
        wait(browser, lambda d: status(d) == "running" and len(log_text(d)) > held)
        # The lines are the counter, in order, none missing or doubled.
        numbers = [int(n) for n in log_text(browser).split()]
        assert numbers == list(range(len(numbers)))
        browser.find_element(By.ID, "sv-cancel").click()
        wait(browser, lambda d: status(d) == "cancelled")
        assert "cancelled" in text(browser, "sv-final")
        assert owner.until("process.completed", sid)["status"] == "cancelled"
    finally:
        owner.close()
    assert not csp_errors(browser)


BYTES_CODE = ("import sys\n"
              "def part(tag):\n"
              "    for i in range(400):\n"
              "        sys.stdout.write(f'{tag} {i:04d} ünïcødé ✓ \\t\"<b>not html</b>\"\\n')\n"
              "    sys.stdout.flush()\n"
              "part('one')\n"
              "sys.stdin.readline()\n"
              "part('two')\n")


def test_watch_in_browser_while_another_client_owns(browser: Any, server: Serve,
                                                     shots: Path) -> None:
    owner = Client(server.ws_url)
    sid = owner.request("execute", command=[PY, "-c", BYTES_CODE], stdin=True)["session_id"]
    try:
        open_console(browser, server)
        open_session(browser, sid)
        wait(browser, lambda d: "one 0399" in log_text(d))
        # The browser's connection drops; it reconnects and resumes from its last seq.
        js(browser, "window.dropped = window.ccxConsole.rpc.ws; window.dropped.close()")
        wait(browser, lambda d: js(d, "const c = window.ccxConsole; return c.rpc.ws !== "
                                      "window.dropped && c.rpc.open && c.view.ready"))
        owner.request("input", session_id=sid, data="go\n")
        done = owner.until("process.completed", sid)
        assert done["status"] == "exited" and done["exit_code"] == 0
        wait(browser, lambda d: status(d) == "exited")
        expected = owner.stdout(sid)
        assert len(expected.encode()) == done["stdout_bytes"]
        assert log_text(browser) == expected  # the same text, byte for byte
        assert "<b>not html</b>" in log_text(browser)
        assert not browser.find_elements(By.CSS_SELECTOR, "#sv-log b")  # text, not HTML
        assert not [m for m in owner.notifications if m["method"] == "process.detached"]
        assert "exit code 0" in text(browser, "sv-final")
        browser.save_screenshot(str(shots / "watch.png"))
    finally:
        owner.close()
    assert not csp_errors(browser)


def test_watched_pty_then_take_over(browser: Any, server: Serve, shots: Path) -> None:
    """A PTY session of another client: watched at its owner's size, then taken over."""
    owner = Client(server.ws_url)
    sid = owner.request("execute", command=[PY, "-i", "-q"], pty={"cols": 70, "rows": 20},
                        linger=30)["session_id"]
    try:
        owner.request("input", session_id=sid, data="print('from', 'owner')\r")
        open_console(browser, server)
        open_session(browser, sid)
        wait(browser, lambda d: "from owner" in terminal_text(d))
        assert "watching" in text(browser, "sv-mode")
        size = "const t = window.ccxConsole.view.terminal.term; return [t.cols, t.rows]"
        wait(browser, lambda d: js(d, size) == [70, 20])  # a watcher does not resize it
        browser.find_element(By.ID, "sv-take").click()
        wait(browser, lambda d: "owner" in text(d, "sv-mode"))
        assert owner.until("process.detached", sid) == {"session_id": sid}
        browser.find_element(By.CSS_SELECTOR, "#sv-term .xterm-helper-textarea").send_keys(
            "print(2**10)" + Keys.ENTER)
        wait(browser, lambda d: "\n1024\n" in terminal_text(d))
        wait(browser, lambda d: js(d, size) != [70, 20])  # its owner now: it follows the window
        browser.save_screenshot(str(shots / "pty-taken-over.png"))
        browser.find_element(By.ID, "sv-cancel").click()
        wait(browser, lambda d: status(d) == "cancelled")
    finally:
        owner.close()
    assert not csp_errors(browser)


def test_csp_is_enforced_and_reported(browser: Any, server: Serve) -> None:
    """The "no CSP errors" checks above mean something: an inline style without the
    page's nonce is refused, and the refusal shows in the browser log."""
    open_console(browser, server)
    csp_errors(browser)  # empty the log
    applied = js(browser, """
        const style = document.createElementNS('http://www.w3.org/1999/xhtml', 'style');
        style.textContent = 'body { margin-left: 77px; }';
        document.head.append(style);
        return getComputedStyle(document.body).marginLeft;""")
    assert applied != "77px"
    wait(browser, lambda d: csp_errors(d))


def test_token_is_asked_for_and_never_in_a_url(browser: Any, shots: Path) -> None:
    server = Serve(env={"CCX_TOKEN": TOKEN, "CCX_ALLOWED_COMMANDS": PY})
    try:
        browser.get(server.page)
        wait(browser, lambda d: d.find_element(By.ID, "login").is_displayed())
        assert text(browser, "conn") == "token required"
        browser.save_screenshot(str(shots / "login.png"))
        # The page's own WebSocket without the token (or with a wrong one) is refused.
        probe = """
            const done = arguments[arguments.length - 1];
            const ws = new WebSocket(arguments[0], arguments[1]);
            ws.onopen = () => { ws.close(); done('open'); };
            ws.onclose = () => done('refused');
        """
        browser.set_script_timeout(WAIT_S)
        wrong = "ccx.bearer." + base64.urlsafe_b64encode(b"wrong").decode().rstrip("=")
        assert browser.execute_async_script(probe, server.ws_url, ["ccx"]) == "refused"
        assert browser.execute_async_script(probe, server.ws_url, [wrong, "ccx"]) == "refused"
        browser.find_element(By.ID, "token").send_keys("wrong" + Keys.ENTER)
        wait(browser, lambda d: text(d, "login-error") == "refused: wrong token?")
        assert not browser.find_element(By.ID, "main").is_displayed()
        browser.find_element(By.ID, "token").clear()
        browser.find_element(By.ID, "token").send_keys(TOKEN + Keys.ENTER)
        wait(browser, lambda d: text(d, "conn") == "connected")
        # Starting from the page obeys the server's allow-list like any other client.
        browser.find_element(By.ID, "start-command").send_keys("sh -c 'echo hi'")
        browser.find_element(By.ID, "start-submit").click()
        wait(browser, lambda d: "(-32001)" in text(d, "start-error"))
        assert js(browser, "return window.ccxConsole.rpc.ws.protocol") == "ccx"
        assert TOKEN not in browser.current_url
        with contextlib.closing(Client(server.ws_url, TOKEN)) as owner:
            sid = owner.request("execute", command=[PY, "-c", "print('hi')"])["session_id"]
            owner.until("process.completed", sid)
            wait(browser, lambda d: sid in dict(js(d, ROWS)))
        requested = js(browser, "return performance.getEntries().map(e => e.name)")
        assert not [url for url in requested if TOKEN in url]
    finally:
        js(browser, "sessionStorage.clear()")
        server.stop()
