"""The course website builds, offline, with warnings as errors, and shows what it should.

Building it is CI's one execution of the labs (the slow test of the suite, a few minutes on
2 cores; deselect it with ``-m "not docs"``): each lab, as the site shows it (the student
release, see ``docs/conf.py``), runs top to bottom in a fresh kernel, and right after each
cell that shows a panel a student's play with it (``tests/panel_play.py``: every control
moved, Run, Run and Stop) before the cells below. The executed notebooks, without the play,
are the pages: Sphinx builds them with myst-nb's execution off. Everything runs with the
network refused to Python (a ``sitecustomize`` that lets only loopback connections through,
inherited by the kernels), so a theme, template or script fetched at build time fails it.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import nbformat
import pytest

import panel_play

ROOT = Path(__file__).resolve().parent.parent
LABS = sorted((ROOT / "labs").glob("*.ipynb"))
BUILD_TIMEOUT = 300   # seconds for Sphinx alone, the labs already executed
RUN_TIMEOUT = 1500    # seconds for executing every lab and playing its panels (minutes on 2 cores)
pytestmark = pytest.mark.timeout(RUN_TIMEOUT + BUILD_TIMEOUT + 60)   # the first docs test waits

NO_NETWORK = textwrap.dedent('''
    """Refuse every connection and name lookup that leaves this machine (docs build test)."""
    import socket

    _LOCAL = ("127.", "::1", "localhost", "0.0.0.0")

    def _check(host):
        if host is not None and not str(host).startswith(_LOCAL) and host != socket.gethostname():
            raise OSError(f"network access refused during the docs build: {host!r}")

    _getaddrinfo, _connect, _connect_ex = socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex

    def getaddrinfo(host, *args, **kwargs):
        _check(host)
        return _getaddrinfo(host, *args, **kwargs)

    def connect(self, address):
        if isinstance(address, tuple):
            _check(address[0])
        return _connect(self, address)

    def connect_ex(self, address):
        if isinstance(address, tuple):
            _check(address[0])
        return _connect_ex(self, address)

    socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = getaddrinfo, connect, connect_ex
''')


@pytest.fixture(scope="module")
def guarded_env(tmp_path_factory):
    """This process's environment with the network refused to Python (see above)."""
    guard = tmp_path_factory.mktemp("guard")
    (guard / "sitecustomize.py").write_text(NO_NETWORK)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(guard), *filter(None, [os.environ.get("PYTHONPATH")])])}


@pytest.fixture(scope="module")
def executed(tmp_path_factory, guarded_env):
    """Every lab's page executed once, its panels played: ``(folder, {lab name: failure})``
    (a failed lab keeps the outputs of the cells before the failure)."""
    conf = _docs_conf()
    folder = tmp_path_factory.mktemp("executed")
    env = {**guarded_env, "DISTLAB_SMALL": "1", "DISTLAB_STATIC_FIGURES": "1"}
    failures = {}
    for lab in LABS:
        nb = conf.website_notebook(lab)
        cwd = tmp_path_factory.mktemp(lab.stem)
        try:
            panel_play.execute(nb, cwd=cwd, env=env)
        except panel_play.LabFailed as e:
            failures[lab.name] = str(e)
        nbformat.write(nb, folder / lab.name)
    return folder, failures


def _docs_conf():
    """``docs/conf.py`` as a module (for ``website_notebook``: which notebook a page shows)."""
    spec = importlib.util.spec_from_file_location("distlab_docs_conf", ROOT / "docs" / "conf.py")
    conf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(conf)
    return conf


@pytest.fixture(scope="module")
def site(tmp_path_factory, guarded_env, executed):
    """The website, built as the README says but into a temporary folder, from the executed
    labs, network refused."""
    out = tmp_path_factory.mktemp("docs") / "html"
    env = {**guarded_env, "DISTLAB_DOCS_EXECUTED": str(executed[0])}
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "docs", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
    assert proc.returncode == 0, f"the docs build failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return out


@pytest.mark.docs
@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_lab_runs_top_to_bottom_with_its_panels_played(executed, lab):
    failure = executed[1].get(lab.name)
    assert failure is None, f"{lab.name}: {failure}"


@pytest.mark.docs
def test_the_first_page_says_how_to_open_each_lab_on_binder(site):
    page = (site / "index.html").read_text()
    assert "Binder" in page
    for lab in LABS:
        assert "mybinder.org/v2/gh/" in page and f"labs/{lab.name}" in page, lab.name


@pytest.mark.docs
@pytest.mark.parametrize("lab", LABS, ids=[p.stem for p in LABS])
def test_every_lab_page_has_an_interactive_plotly_figure(site, lab):
    page = site / "labs" / f"{lab.stem}.html"
    assert page.exists(), f"no page for {lab.name}"
    html = page.read_text()
    assert 'class="plotly-graph-div"' in html and "Plotly.newPlot" in html, lab.name
    head = html[:html.index("</head>")]
    assert "_static/plotly.min.js" in head, "plotly.js from the site (no CDN), before the figures"
    assert "cdn.plot.ly" not in html, lab.name
    assert len(html) < 2_000_000, f"{lab.name}: {len(html)} bytes (a FigureWidget's bundle?)"


@pytest.mark.docs
def test_the_site_serves_plotly_js_from_the_plotly_package(site):
    import plotly
    shipped = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert (site / "_static" / "plotly.min.js").read_bytes() == shipped.read_bytes()


@pytest.mark.docs
def test_the_api_reference_documents_every_folder(site):
    api = site / "api"
    assert "ShardedOptimizer" in (api / "sharding.html").read_text()
    assert "distlab.launch" in (api / "bench.html").read_text()
    for folder in ("communication", "data_parallel", "asynchronous", "sharding", "model_parallel",
                   "communication_efficient", "fault_tolerance", "problems", "ui", "course"):
        assert (api / f"{folder}.html").exists(), folder


@pytest.mark.docs
def test_the_course_guide_is_a_page(site):
    assert "course guide" in (site / "course_guide.html").read_text()


def test_a_live_figure_on_a_static_page_shows_its_last_drawing(tmp_path):
    """Under DISTLAB_STATIC_FIGURES=1 a LiveFigure shown before its run redraws that copy in
    place, so the built page shows the finished run, not the empty figure of its cell."""
    import nbclient
    cells = ["from distlab.ui.figures import LiveFigure\nimport pandas as pd\n"
             "figure = LiveFigure()\nfigure",
             "figure.add_frame(pd.DataFrame({'rank': 0, 'step': [0, 1, 2], 'loss': [3.0, 2.0, 1.0]}),"
             " run='the run')"]
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells])
    nb.metadata["kernelspec"] = {"name": "python3", "language": "python", "display_name": "Python 3"}
    os.environ["DISTLAB_STATIC_FIGURES"] = "1"   # the kernel inherits it
    try:
        nbclient.execute(nb, cwd=str(tmp_path), timeout=120)
    finally:
        del os.environ["DISTLAB_STATIC_FIGURES"]
    shown = nb.cells[0].outputs
    assert len(shown) == 1 and "text/html" in shown[0].data, shown
    html = shown[0].data["text/html"]
    assert 'class="plotly-graph-div"' in html and "the run" in html, "the copy was redrawn"
    assert "widget-view+json" not in json.dumps(shown), "a static copy, not a widget"
