"""The notebooks run top to bottom in a real Jupyter kernel, and fail on any error."""

from __future__ import annotations

import os

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "notebooks")


@pytest.mark.slow
def test_pipeline_prototyping_notebook(tmp_path):
    nb = nbformat.read(os.path.join(NOTEBOOKS, "pipeline_prototyping.ipynb"), as_version=4)
    # Its own kernel process, hence its own embedded Ray, as for a user.
    NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    text = "\n".join(
        o.get("text", "") + str(o.get("data", {}).get("text/plain", "")) for outs in outputs.values() for o in outs
    )
    assert "'version': 2" in text and "p50" in text and "done, nothing left behind" in text
    assert any("image/png" in o.get("data", {}) for outs in outputs.values() for o in outs), "the latency plot"
