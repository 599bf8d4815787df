"""Sphinx configuration of the course website: the labs executed, the guide, the API.

Build it (offline: the theme, myst-nb and plotly.js all come from installed packages)::

    .venv/bin/python -m sphinx -W --keep-going -b html docs docs/_build/html

The site shows each lab as a student receives it: the student release
(:func:`distlab.course.grading.release_notebook`, solutions cleared, hidden tests removed),
whose check cells show what a student sees before solving. myst-nb executes them at the small setting
(``DISTLAB_SMALL=1``) while it reads them, so the pages show real runs; a lab that fails
fails the build. Under ``DISTLAB_DOCS_EXECUTED=FOLDER`` the notebooks in that folder, already
executed, are the pages and myst-nb executes nothing: ``tests/test_docs.py`` executes each
lab once, playing with its panels, and builds the site from what it ran.
``DISTLAB_STATIC_FIGURES=1`` makes the labs' figures plotly HTML instead of widgets (see
:mod:`distlab.ui.figures`), and the page loads plotly.js from the plotly package, copied into
``_static``. The API pages (``docs/api/``, not committed) are written at each build from the
package's modules, so a new module is documented without editing anything here.
"""
from __future__ import annotations

import importlib
import json
import os
import pkgutil
from pathlib import Path

import nbformat
import plotly
from sphinx.ext.napoleon import Config as NapoleonConfig, GoogleDocstring

import distlab

DOCS = Path(__file__).resolve().parent
SOURCES = sorted((DOCS.parent / "labs").glob("*.ipynb"))
LABS = DOCS / "labs"     # the pages of the labs, written at each build (not committed)
EXECUTED = os.environ.get("DISTLAB_DOCS_EXECUTED")
"""A folder of the labs' pages already executed (see above), or None: myst-nb executes."""

project = "distlab"
author = "the distlab authors"
copyright = "the distlab authors"
release = version = distlab.__version__

extensions = ["myst_nb", "sphinx.ext.autodoc"]
exclude_patterns = ["_build", "**/.ipynb_checkpoints"]
html_theme = "furo"
html_title = f"distlab {release}"
html_static_path = [str(Path(plotly.__file__).parent / "package_data" / "plotly.min.js")]
templates_path = ["_templates"]   # page.html: plotly.js in <head>, before the figures' scripts

# Warnings are errors in CI (-W): a reference that resolves to nothing fails the build.
nitpicky = True
nitpick_ignore_regex = [   # types from other libraries: no inventories are fetched (offline)
    (r"py:.*", r"(torch|np|numpy|pd|pandas|go|plotly|W|ipywidgets|dist|nn|mp|threading|"
               r"multiprocessing|pathlib|collections|typing|concurrent|queue|socket|"
               r"dataclasses|os|subprocess|datetime|io|contextlib|argparse|nbformat|nbgrader)(\..*)?"),
    (r"py:.*", r"(Any|Callable|Iterable|Iterator|Sequence|Mapping|Path|Tensor|Module|"
               r"DataFrame|Figure|Widget|ProcessGroup|Optimizer|NoneType|optional|"
               r"Generator|Literal|Union|Protocol|TypeVar|T|Self)"),
    (r"py:.*", r"(.*\.)?_\w+"),   # private helpers are not part of the reference
]

# myst-nb: execute every lab on each build (unless EXECUTED), each cell given up to 10 minutes.
nb_execution_mode = "off" if EXECUTED else "force"
nb_execution_timeout = 600
nb_execution_raise_on_error = True
nb_execution_show_tb = True
nb_ipywidgets_js = {}      # no widget manager from a CDN: widgets need a live kernel anyway
myst_enable_extensions = ["dollarmath", "substitution"]
myst_heading_anchors = 3

autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_inherit_docstrings = False    # torch's own docstrings (autograd.Function...) are torch's
autodoc_default_options = {"ignore-module-all": True,   # each object under its defining module
                           "undoc-members": True}

BINDER_REPO = os.environ.get("DISTLAB_BINDER_REPO", "OWNER/REPO")
"""The GitHub ``owner/name`` the Binder links open; set it when publishing the site."""


def binder_url(lab: Path) -> str:
    """The Binder launch link of one lab (the pattern in ``binder/README.md``)."""
    return f"https://mybinder.org/v2/gh/{BINDER_REPO}/HEAD?urlpath=lab/tree/labs/{lab.name}"


def website_notebook(lab: Path) -> nbformat.NotebookNode:
    """The notebook the site shows for the source ``lab``: its student release (what
    ``python -m distlab course release`` writes), which runs top to bottom unsolved."""
    from distlab.course.grading import release_notebook
    return release_notebook(nbformat.read(lab, as_version=4), solutions=False)


def write_lab_pages(app) -> None:
    """Write the labs' pages into ``docs/labs`` (a page must lie under ``docs/``; a symbolic
    link would send MyST's links between labs outside it): the executed ones from
    :data:`EXECUTED`, else each :func:`website_notebook`. Unchanged pages are left alone."""
    LABS.mkdir(exist_ok=True)
    for lab in SOURCES:
        page = (Path(EXECUTED) / lab.name).read_text() if EXECUTED else \
            nbformat.writes(website_notebook(lab)) + "\n"
        _write_if_changed(LABS / lab.name, page)
    for stale in set(LABS.glob("*.ipynb")) - {LABS / lab.name for lab in SOURCES}:
        stale.unlink()


def lab_title(lab: Path) -> str:
    first = json.loads(lab.read_text())["cells"][0]["source"]
    return "".join(first).splitlines()[0].lstrip("# ").strip()


myst_substitutions = {
    "binder_repo": BINDER_REPO,
    "binder_table": "\n".join(
        ["| lab | open it on Binder |", "|---|---|"]
        + [f"| [{lab_title(lab)}](labs/{lab.stem}.ipynb) | [launch]({binder_url(lab)}) |"
           for lab in SOURCES]),
}


# The API reference: one page per folder of the package, every module of it in turn.

API = DOCS / "api"
TOP_LEVEL = "bench"      # the page of distlab's own modules (launcher, worker, comm, ...)


def api_pages() -> dict[str, list[str]]:
    """``{page: [module, ...]}``: ``bench`` for distlab's top-level modules, one per folder."""
    pages: dict[str, list[str]] = {TOP_LEVEL: ["distlab"]}
    for info in pkgutil.walk_packages(distlab.__path__, "distlab."):
        parts = info.name.split(".")
        if parts[-1].startswith("_"):        # __main__ is the command line, not an API
            continue
        page = parts[1] if info.ispkg or len(parts) > 2 else TOP_LEVEL
        pages.setdefault(page, []).append(info.name)
    return pages


def write_api_pages(app) -> None:
    API.mkdir(exist_ok=True)
    pages = api_pages()
    for page, modules in pages.items():
        title = "distlab (the bench every lab stands on)" if page == TOP_LEVEL else f"distlab.{page}"
        blocks = [_automodule(module, page) for module in modules]
        _write_if_changed(API / f"{page}.md", f"# {title}\n\n" + "\n".join(blocks))
    toc = "\n".join(sorted(pages, key=lambda p: (p != TOP_LEVEL, p)))
    _write_if_changed(API / "index.md", "# API reference\n\nGenerated from the docstrings.\n\n"
                      f"```{{toctree}}\n:maxdepth: 1\n\n{toc}\n```\n")
    for stale in set(API.glob("*.md")) - {API / f"{p}.md" for p in [*pages, "index"]}:
        stale.unlink()


def _automodule(module: str, page: str) -> str:
    """The autodoc block of one module: what it defines (not what it imports). ``distlab``
    itself shows its public names (``launch``, ``Run``...), which then are not repeated under
    the modules that define them (:func:`resolve_reexports` sends references there)."""
    options = ":members:\n"
    if module == "distlab":
        options += ":imported-members:\n:no-ignore-module-all:\n"
    elif page == TOP_LEVEL:
        options += f":exclude-members: {', '.join(distlab.__all__)}\n"
    options = "".join(f"   {line}\n" for line in options.splitlines())
    return f"```{{eval-rst}}\n.. automodule:: {module}\n{options}```\n"


def _write_if_changed(path: Path, text: str) -> None:
    if not path.exists() or path.read_text() != text:   # unchanged pages are not re-read
        path.write_text(text)


GOOGLE_STYLE = NapoleonConfig(napoleon_use_param=True, napoleon_use_rtype=True,
                              napoleon_custom_sections=["Returns"])   # prose, not "type: text"


def google_sections(app, what, name, obj, options, lines) -> None:
    """``Args:``, ``Raises:`` and the other Google-style sections, as napoleon reads them,
    except where distlab writes prose with a colon that napoleon would read as a type: the
    docstring of a field or constant (``"What is trained: ..."``) and ``Returns:``
    (``"One row per run: ..."``)."""
    if what not in ("attribute", "data", "property"):
        lines[:] = GoogleDocstring(lines, GOOGLE_STYLE, app, what, name, obj, options).lines()


def resolve_reexports(app, env, node, contnode):
    """A reference to an object by a name it is imported under (``Workload`` inside
    ``distlab.problems.convex``, ``distlab.launcher.start``) goes to where the reference
    documents it: under the module that defines it, or under ``distlab`` for the public names
    (``distlab.start``, ``distlab.Run.result``)."""
    if node.get("refdomain") != "py":
        return None
    target = node["reftarget"]
    obj = _lookup(target) or _lookup(f"{node.get('py:module')}.{target}")
    qualname = getattr(obj, "__qualname__", None)
    if qualname is None or "<" in qualname:
        return None
    owner = qualname.split(".")[0]
    public = owner in distlab.__all__ and getattr(distlab, owner) is _lookup(
        f"{obj.__module__}.{owner}")
    where = f"distlab.{qualname}" if public else f"{obj.__module__}.{qualname}"
    if where == target:
        return None
    return env.get_domain("py").resolve_xref(env, node["refdoc"], app.builder, node["reftype"],
                                             where, node, contnode)


def _lookup(dotted: str):
    """The object a dotted name denotes (a module, then attributes), or None."""
    parts = dotted.split(".")
    for k in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:k]))
        except ImportError:
            continue
        for part in parts[k:]:
            obj = getattr(obj, part, None)
        return obj
    return None


def setup(app):
    # Read by the kernels myst-nb starts, which inherit this process's environment (set here,
    # not at import, so that tests/test_docs.py can import website_notebook from this file).
    os.environ["DISTLAB_SMALL"] = "1"
    os.environ["DISTLAB_STATIC_FIGURES"] = "1"
    app.connect("builder-inited", write_lab_pages)
    app.connect("builder-inited", write_api_pages)
    app.connect("autodoc-process-docstring", google_sections)
    app.connect("missing-reference", resolve_reexports)
