"""End to end, as a student sees it: JupyterLab in headless Chromium runs lab 00, a slider
moves, Run is pressed, and the live plotly figure gains the new run's line.

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``), driven by
Playwright for Python through its executable path: Playwright never downloads a browser
here. Without that Chromium the test is skipped, saying so. A screenshot of the final page
is saved to ``artifacts/browser_lab00.png`` (also on failure, for the CI log).
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

pytestmark = [pytest.mark.browser, pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parent.parent
LAB = ROOT / "labs" / "00_start_here.ipynb"
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "distlab-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a free 127.0.0.1 port, serving a copy of lab 00 (the real file is never
    autosaved with outputs), with its own config and runtime folders."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    root = tmp_path / "labs"
    root.mkdir()
    shutil.copy(LAB, root / LAB.name)
    # Render every cell (no windowing, so the whole notebook is in the page) and no news toast.
    settings = tmp_path / "settings"
    for name, value in [("notebook-extension/tracker", '{"windowingMode": "none"}'),
                        ("apputils-extension/notification", '{"fetchNews": "false"}')]:
        path = settings / f"@jupyterlab/{name}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(value)
    port = _free_port()
    env = {**os.environ, "DISTLAB_SMALL": "1", "PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD": "1",
           "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
           "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
           "JUPYTERLAB_WORKSPACES_DIR": str(tmp_path / "workspaces"),
           "JUPYTERLAB_SETTINGS_DIR": str(settings)}
    log = open(tmp_path / "jupyterlab.log", "w")
    server = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={port}",
         "--ServerApp.port_retries=0", f"--IdentityProvider.token={TOKEN}",
         f"--ServerApp.root_dir={root}", "--LabApp.news_url=None", "--LabApp.extension_manager=readonly",
         "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={TOKEN}", timeout=2)
                break
            except Exception:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail("JupyterLab did not start:\n"
                                + (tmp_path / "jupyterlab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield base
    finally:
        # SIGINT twice is JupyterLab's own clean shutdown: kernels (and so their distlab
        # workers, which die with their parent) go first.
        for _ in range(2):
            if server.poll() is None:
                server.send_signal(signal.SIGINT)
                time.sleep(0.5)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def _accept_kernel_dialog(page):
    """JupyterLab asks which kernel to start when it cannot decide alone: take its choice."""
    dialog = page.locator(".jp-Dialog:has-text('Select Kernel')")
    try:
        dialog.wait_for(timeout=8000)
    except Exception:
        return  # the notebook's kernel spec was found and started without asking
    dialog.locator(".jp-Dialog-button.jp-mod-accept").click()


def _code_cells_done(page, num_code_cells: int) -> bool:
    """Every code cell has run: the prompts read [1]: ... [num_code_cells]:, none is [*]."""
    prompts = [p.strip() for p in
               page.locator(".jp-Notebook .jp-CodeCell .jp-InputArea-prompt").all_inner_texts()]
    return (len(prompts) == num_code_cells and "[*]:" not in prompts
            and prompts[-1] == f"[{num_code_cells}]:")


def test_lab_00_in_a_real_browser(jupyterlab):
    from playwright.sync_api import expect, sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "browser_lab00.png"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{jupyterlab}/lab/tree/{LAB.name}?token={TOKEN}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            _accept_kernel_dialog(page)
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
                   ).to_have_count(1, timeout=120_000)

            # Run > Run All Cells, from the menu bar, as a student would.
            page.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
            page.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()
            deadline = time.monotonic() + 240
            num_code_cells = sum(c.cell_type == "code" for c in nbformat.read(LAB, 4).cells)
            while not _code_cells_done(page, num_code_cells):
                assert time.monotonic() < deadline, "Run All did not finish in 240 s"
                time.sleep(1)
            text = page.locator(".jp-Notebook").inner_text()
            for bad in ("Traceback", "AssertionError", "WorkerError"):
                assert bad not in text, f"a cell failed in the browser ({bad})"
            assert "[rank 3] hello from rank 3 of 4" in text, "worker output shown in the cell"

            # The panel: the "nodes" slider stands at 4 after the programmatic runs.
            panel = page.locator(".widget-vbox", has=page.locator(".widget-label",
                                                                  has_text="nodes")).first
            panel.scroll_into_view_if_needed()
            nodes = panel.locator(".widget-slider", has=page.locator(".widget-label",
                                                                     has_text="nodes")).first
            readout = nodes.locator(".widget-readout")
            expect(readout).to_have_text("4")
            loss_plot = panel.locator(".js-plotly-plot").first
            expect(loss_plot.locator(".legendtext")).to_have_count(2)

            # Move the slider one notch down with the keyboard, then press Run.
            handle = nodes.locator(".noUi-handle")
            handle.click()
            handle.press("ArrowLeft")
            expect(readout).to_have_text("3")
            panel.locator("button.jupyter-button", has_text="Run").first.click()

            # The widget state is shown (status line) and the figure gains the new run's line.
            status = panel.locator(".widget-html", has_text="world_size=3")
            expect(status).to_contain_text("done", timeout=120_000)
            expect(loss_plot.locator(".legendtext")).to_have_count(3, timeout=30_000)
            expect(loss_plot.locator(".legendtext", has_text="world_size=3")).to_have_count(1)
            expect(loss_plot.locator(".scatterlayer .trace")).to_have_count(3)
            panel.screenshot(path=str(shot))
        except BaseException:
            page.screenshot(path=str(shot), full_page=True)
            raise
        finally:
            browser.close()
    assert shot.stat().st_size > 10_000
