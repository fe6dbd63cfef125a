"""app.py in a real browser: headless Chromium (Debian's, through Playwright's Python API; no browser download)
picks objects, draws, and asks for too many."""
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import REPO

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# the flags this machine's closed network needs: no background connections, no sandbox as root
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]
FIVE = ["gray cube", "blue cube", "green cube", "yellow sphere", "brown cylinder"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def served(tiny_run):
    """app.py serving the tiny model on a free local port; stopped afterwards."""
    pytest.importorskip("gradio")
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "app.py", "--model", str(tiny_run / "model"), "--port", str(port)],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                time.sleep(1)
        else:
            pytest.fail("app.py did not answer within 2 minutes")
        yield url, server
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_the_page_draws_a_scene_and_refuses_seven_objects_in_one_line(served, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    if not os.path.isfile(CHROMIUM):
        pytest.skip("no Chromium here (apt-get install chromium chromium-driver)")
    url, server = served
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.goto(url)
        page.get_by_label("red sphere").check()
        page.get_by_label("cyan cube").check()
        page.locator("#draw").click()
        page.locator("#gallery img").first.wait_for(timeout=120_000)
        page.locator("#strip img").first.wait_for(timeout=60_000)
        message = page.locator("#message").inner_text()
        assert "image(s) of red sphere, cyan cube in" in message and "error" not in message
        assert page.locator("#gallery img").count() >= 1
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
        if os.environ.get("ICLEVR_APP_SCREENSHOT"):  # docs/app.png is taken with the shipped model
            shutil.copyfile(tmp_path / "app.png", os.environ["ICLEVR_APP_SCREENSHOT"])
        for name in FIVE:  # 7 objects in all
            page.get_by_label(name).check()
        page.locator("#draw").click()
        page.get_by_text("error:").wait_for(timeout=60_000)
        assert page.locator("#message").inner_text() == (
            "error: condition 0: 7 labels, but this model draws at most 6 objects (3 jointly, more by composing "
            "3-object sub-requests)")
        browser.close()
    assert server.poll() is None  # a refused request does not stop the server
    assert (tmp_path / "app.png").read_bytes()[:4] == b"\x89PNG"


def test_a_bad_port_is_one_line():
    from conftest import last_line, run_main

    code, _, err = run_main("app.py", "--port", 70000)
    assert code == 2 and last_line(err).endswith("error: --port must be between 1 and 65535 (got 70000)")
