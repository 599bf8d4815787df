"""End to end, as a student sees it: JupyterLab in headless Chromium runs a lab cell by cell;
right after a cell that shows a panel, the student plays with it (every control moved to
its neighbouring value, Run, then Run and Stop), and then the cells below run without an
error. CI does this for lab 00 (its nodes slider moved, Run, the live figure gains the
run's line); ``DISTLAB_BROWSER_ALL=1`` does it for every lab (about as long as the labs
themselves in a browser, too slow for CI).

Needs Debian's Chromium at /usr/bin/chromium (``apt-get install -y chromium``), driven by
Playwright for Python through its executable path: Playwright never downloads a browser
here. Without that Chromium the test is skipped, saying so. A screenshot of the last panel
played is saved to ``artifacts/browser_<lab>.png`` (of the page on failure, for the CI log).
"""
import os
import re
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

pytestmark = [pytest.mark.browser, pytest.mark.timeout(1200)]

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted((ROOT / "labs").glob("*.ipynb"))
CI_LAB = "00_start_here.ipynb"
ALL = os.environ.get("DISTLAB_BROWSER_ALL", "0") not in ("", "0")
CELL_TIMEOUT = 600   # seconds one cell may take in the browser, at the small setting
ARTIFACTS = ROOT / "artifacts"
CHROMIUM = "/usr/bin/chromium"
TOKEN = "distlab-browser-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def jupyterlab(tmp_path):
    """JupyterLab on a free 127.0.0.1 port, serving copies of the labs (the real files are
    never autosaved with outputs), with its own config and runtime folders."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's Chromium (apt-get install -y chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright (Python) is not installed")
    root = tmp_path / "labs"
    root.mkdir()
    for lab in LABS:
        shutil.copy(lab, root / lab.name)
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


@pytest.mark.parametrize("lab", [
    pytest.param(lab, id=lab.stem, marks=pytest.mark.skipif(
        lab.name != CI_LAB and not ALL,
        reason="every lab in the browser: set DISTLAB_BROWSER_ALL=1 (too slow for CI)"))
    for lab in LABS])
def test_lab_in_a_real_browser_with_its_panels_played(jupyterlab, lab):
    """Lab 00 in CI; every lab under ``DISTLAB_BROWSER_ALL=1`` (too slow for CI: each lab
    runs cell by cell in the browser, a few minutes for the long ones on 2 cores)."""
    from playwright.sync_api import expect, sync_playwright
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / f"browser_{lab.stem}.png"
    cells = nbformat.read(lab, 4).cells
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        try:
            page.goto(f"{jupyterlab}/lab/tree/{lab.name}?token={TOKEN}")
            page.locator(".jp-Notebook .jp-Cell").first.wait_for()
            _accept_kernel_dialog(page)
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")
                   ).to_have_count(1, timeout=120_000)
            played = []
            for index, cell in enumerate(cells):
                if cell.cell_type != "code":
                    continue
                view = _run_cell(page, index)
                for panel in view.locator(PANEL).all():
                    played.append(_play(page, panel, f"{lab.name}, cell {index}"))
                    panel.screenshot(path=str(shot))
            assert played or lab.name != CI_LAB, "lab 00 shows a panel"
            if lab.name == CI_LAB:
                text = page.locator(".jp-Notebook").inner_text()
                assert "[rank 3] hello from rank 3 of 4" in text, "worker output shown in the cell"
                moved, status = played[0]
                nodes = moved["nodes"][1]
                assert moved["nodes"][0] != nodes and f"world_size={nodes}" in status, (moved, status)
        except BaseException:
            page.screenshot(path=str(shot), full_page=True)
            raise
        finally:
            browser.close()
    if played:
        assert shot.stat().st_size > 10_000


PANEL = ".widget-vbox:has(button.jupyter-button:has-text('Clear plots'))"
"""A RunPanel in a cell's output: the box with Run, Stop and Clear plots."""


def _run_cell(page, index: int):
    """Select the notebook's cell ``index``, run it (Ctrl+Enter, as a student does), wait for
    it to finish, and fail, naming the cell, if it shows an error. Returns the cell's view."""
    view = page.locator(".jp-Notebook .jp-Cell").nth(index)
    view.locator(".jp-InputPrompt").first.click()
    page.keyboard.press("Control+Enter")
    prompt = view.locator(".jp-InputArea-prompt").first
    deadline = time.monotonic() + CELL_TIMEOUT
    while not re.fullmatch(r"\[\d+\]:", prompt.inner_text().strip()):
        assert time.monotonic() < deadline, f"cell {index} did not finish in {CELL_TIMEOUT} s"
        time.sleep(0.25)
    area = view.locator(".jp-Cell-outputArea")
    out = area.first.inner_text() if area.count() else ""
    for bad in ("Traceback", "AssertionError", "WorkerError"):
        assert bad not in out, f"cell {index} failed in the browser ({bad}):\n{out[-3000:]}"
    return view


def _play(page, panel, where: str):
    """Move every control of ``panel`` one notch (down where it can), press Run and wait for
    "done" (or the failure a panel injects on purpose, as in tests/panel_play.py), then Run
    and Stop. Returns ``({label: (old, new)}, the status after the run)``."""
    from playwright.sync_api import expect
    panel.scroll_into_view_if_needed()
    controls, bar = panel.locator(":scope > .widget-hbox").nth(0), panel.locator(":scope > .widget-hbox").nth(1)
    moved = {}
    for control in controls.locator(":scope > *").all():
        label = control.locator(".widget-label").first.inner_text().strip() \
            if control.locator(".widget-label").count() else f"control {len(moved)}"
        moved[label] = _move(control, f"{where}, {label!r}")
    run = bar.locator("button.jupyter-button", has_text="Run").first
    stop = bar.locator("button.jupyter-button", has_text="Stop").first
    status = bar.locator(".widget-html").first
    done = _press_and_wait(run, status, f"{where}: Run with {moved}")
    # A panel that injects failures (lab 07's "failure", "failing rank") may fail on purpose.
    injects = any(label.lower().startswith("fail") for label in moved)
    assert "done" in done or (injects and "failed" in done), \
        f"{where}: Run with {moved} ended with {done!r}"
    # Lines, dots or bars (lab 11's Gantt chart): the panel's figure drew this run.
    expect(panel.locator(".js-plotly-plot .scatterlayer .trace, "
                         ".js-plotly-plot .barlayer .trace").first).to_be_attached()
    before = status.inner_text()
    run.click()
    _stop_while_running(run, stop, status, before, f"{where}: Run and Stop")
    stopped = _until_ready(run, status, None, f"{where}: Run and Stop")
    assert "stopped" in stopped or "done" in stopped, f"{where}: after Stop: {stopped!r}"
    return moved, done


def _stop_while_running(run, stop, status, before: str, what: str) -> None:
    """Press Stop as soon as it is enabled; a run that ends first (a short one) is left be.
    A run that ended between two looks with the same status text as the run before it
    leaves nothing to see: after 20 s with Run enabled, it counts as ended."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    t0 = time.monotonic()
    while True:
        if stop.is_enabled():
            try:      # the run may end (Stop disabled again) between the look and the click
                stop.click(timeout=2_000)
                return
            except PlaywrightTimeout:
                pass
        text = status.inner_text()
        if run.is_enabled() and not text.startswith("running") and (
                text != before or time.monotonic() - t0 > 20):
            return
        assert time.monotonic() - t0 < CELL_TIMEOUT, f"{what}: still {text!r}"
        time.sleep(0.1)


def _press_and_wait(run, status, what: str) -> str:
    before = status.inner_text()
    run.click()
    return _until_ready(run, status, before, what)


def _until_ready(run, status, before: str | None, what: str) -> str:
    """Wait for the status line to change from ``before`` (if given) and leave "running",
    and for Run to be enabled again; the status then."""
    deadline = time.monotonic() + CELL_TIMEOUT
    while True:
        text = status.inner_text()
        if text != before and not text.startswith("running") and run.is_enabled():
            return text
        assert time.monotonic() < deadline, f"{what}: still {text!r} after {CELL_TIMEOUT} s"
        time.sleep(0.25)


def _move(control, where: str):
    """One notch, as a student moves it: a slider's handle by the arrow keys (left, or right
    at the left end), a dropdown's neighbouring option, a checkbox ticked or unticked, another
    toggle button. Returns ``(old, new)`` as the control reads."""
    classes = control.get_attribute("class") or ""
    if "widget-slider" in classes:
        readout, handle = control.locator(".widget-readout"), control.locator(".noUi-handle").first
        old = readout.inner_text().strip()
        handle.click()
        for key in ("ArrowLeft", "ArrowRight", "ArrowRight"):
            handle.press(key)
            if readout.inner_text().strip() != old:
                return old, readout.inner_text().strip()
        raise AssertionError(f"{where}: the slider does not move from {old}")
    if "widget-dropdown" in classes:
        select = control.locator("select")
        i, n = select.evaluate("s => s.selectedIndex"), select.locator("option").count()
        options = select.locator("option").all_inner_texts()
        j = i - 1 if i > 0 else i + 1
        assert 0 <= j < n, f"{where}: a dropdown with one option"
        select.select_option(index=j)
        return options[i], options[j]
    if "widget-checkbox" in classes:
        box = control.locator("input[type=checkbox]")
        old = box.is_checked()
        box.click()
        return old, box.is_checked()
    if "widget-toggle-buttons" in classes:
        buttons = control.locator("button")
        texts = buttons.all_inner_texts()
        active = [k for k in range(len(texts)) if "mod-active" in (buttons.nth(k).get_attribute("class") or "")]
        i = active[0] if active else 0
        j = i - 1 if i > 0 else i + 1
        buttons.nth(j).click()
        return texts[i], texts[j]
    raise AssertionError(f"{where}: no student move is known for a control of class {classes!r}")
