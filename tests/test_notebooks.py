"""Every notebook in notebooks/ runs top to bottom: each code cell's source is exec'd in one shared
namespace, in order (a small runner over the .ipynb JSON; no Jupyter needed). A cell that raises fails
the test with the notebook's name and the cell's number."""
import ast
import json
from pathlib import Path

import pytest
import torch

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


pytestmark = pytest.mark.usefixtures("one_thread")


def code_cells(path):
    notebook = json.loads(path.read_text())
    for number, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] == "code":
            source = cell["source"]
            yield number, "".join(source) if isinstance(source, list) else source


def test_there_are_notebooks():
    assert NOTEBOOKS, "notebooks/ holds no .ipynb"


_RAN = {}


def run_notebook(path) -> dict:
    """The namespace after running every code cell of ``path`` once (later tests of a notebook reuse it)."""
    if path not in _RAN:
        namespace = {"__name__": "__main__"}
        for number, source in code_cells(path):
            try:
                exec(compile(ast.parse(source), f"{path.name} cell {number}", "exec"), namespace)
            except Exception as err:   # noqa: BLE001 - report which cell failed
                pytest.fail(f"{path.name}: code cell {number} raised {type(err).__name__}: {err}")
        _RAN[path] = namespace
    return _RAN[path]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_runs(path):
    run_notebook(path)


def test_sd_notebook_step_by_hand_is_the_pipelines_step():
    """Notebook 02, saved pointing at the tiny test folder (SD_FOLDER = None), builds one SAG + CFG step from
    the package's pieces; it must equal sag.sd.guided_output, the pipeline's own step, with the same mask."""
    path = next(p for p in NOTEBOOKS if p.name == "02_sag_on_stable_diffusion.ipynb")
    ns = run_notebook(path)
    assert ns["SD_FOLDER"] is None and ns["STEPS"] == 4
    assert (ns["guided"] - ns["reference"].output).abs().max().item() <= 1e-5
    assert torch.equal(ns["mask"], ns["caught"][ns["k"]].salient_mask)
    assert 0 < ns["mask"].mean().item() < 1
    assert (ns["guided"] - ns["eps_cfg"]).abs().max().item() > 1e-3            # SAG moved the CFG prediction


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_is_saved_with_outputs(path):
    """The notebooks are committed with their outputs (text and PNG images), so they read without running."""
    notebook = json.loads(path.read_text())
    outputs = [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert any(o["output_type"] == "stream" for o in outputs), f"{path.name} was saved without text outputs"
    assert any("image/png" in o.get("data", {}) for o in outputs), f"{path.name} was saved without images"
