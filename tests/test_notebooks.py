"""Notebook hygiene: every lab is stored clean, runnable, and checks its own claims.

Executing the labs is ``tests/test_docs.py``'s job (each once, its panels played, as the site
is built; ``pytest --nbval-lax labs/NN_*.ipynb`` still runs one by hand); this file checks how
they are stored, so a lab committed with outputs or without an assertion cell fails fast.
"""
from pathlib import Path

import nbformat
import pytest

LABS = sorted((Path(__file__).resolve().parent.parent / "labs").glob("*.ipynb"))


def test_there_is_a_start_here_lab():
    assert any(p.name == "00_start_here.ipynb" for p in LABS)


@pytest.fixture(params=LABS, ids=[p.name for p in LABS])
def lab(request):
    return request.param, nbformat.read(request.param, as_version=4)


def test_stored_without_outputs_or_execution_counts(lab):
    path, nb = lab
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code"
             and (c.outputs or c.execution_count is not None)]
    assert not dirty, (f"{path.name}: code cells {dirty} have outputs or execution counts; "
                       "clear them (jupyter nbconvert --clear-output --inplace)")


def test_valid_with_a_python_kernel_spec(lab):
    path, nb = lab
    nbformat.validate(nb)
    spec = nb.metadata.get("kernelspec", {})
    assert spec.get("name") and spec.get("language") == "python", \
        f"{path.name}: kernelspec is {spec!r}"


def test_imports_distlab(lab):
    path, nb = lab
    assert any(c.cell_type == "code" and ("import distlab" in c.source
                                          or "from distlab" in c.source) for c in nb.cells), \
        f"{path.name} never imports distlab"


def test_has_an_assertion_cell(lab):
    path, nb = lab
    assert any(c.cell_type == "code" and any(ln.lstrip().startswith("assert ")
                                             for ln in c.source.splitlines())
               for c in nb.cells), f"{path.name} has no cell with an assert statement"


def test_starts_with_a_title(lab):
    path, nb = lab
    first = nb.cells[0]
    assert first.cell_type == "markdown" and first.source.lstrip().startswith("# "), \
        f"{path.name} should open with a markdown title"
