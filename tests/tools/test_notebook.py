"""The Colab notebook runs top to bottom, headless, on CPU with the tiny config."""

from __future__ import annotations

import json
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOTEBOOK = os.path.join(ROOT, "notebooks", "meljax_colab.ipynb")
STEPS = 2


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def cell_text(cell) -> str:
    """Everything a cell printed (streams and plain-text results)."""
    parts = []
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            parts.append(out.text)
        elif "data" in out and "text/plain" in out.data:
            parts.append(out.data["text/plain"])
    return "".join(parts)


def find_cell(nb, snippet: str):
    matches = [c for c in code_cells(nb) if snippet in c.source]
    assert len(matches) == 1, f"expected one code cell containing {snippet!r}"
    return matches[0]


def test_notebook_structure():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    params = [c for c in code_cells(nb) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1, "papermill needs exactly one cell tagged 'parameters'"
    for name in ("CONFIG", "STEPS", "WORKDIR"):
        assert re.search(rf"^{name} = ", params[0].source, re.M), name
    assert 'os.environ.get("MELJAX_NOTEBOOK_CONFIG", "demo")' in params[0].source
    for cell in code_cells(nb):
        # IPython magics and shell escapes would not run under plain Python / every kernel.
        assert not re.search(r"^\s*[!%]", cell.source, re.M), cell.source[:80]
        assert not cell.get("outputs"), "the notebook is stored without outputs"
    assert sum(c.cell_type == "markdown" for c in nb.cells) >= 8


@pytest.mark.slow
def test_notebook_runs_headless_with_tiny_config(tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    # The kernel is a child process: it inherits these. One CPU device keeps compiles short.
    monkeypatch.setenv("MELJAX_NOTEBOOK_CONFIG", "tiny")
    monkeypatch.setenv("MELJAX_NOTEBOOK_STEPS", str(STEPS))
    monkeypatch.setenv("MELJAX_NOTEBOOK_WORKDIR", str(workdir))
    monkeypatch.setenv("MELJAX_NOTEBOOK_EVAL_SAMPLES", "0")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=1")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    # jupyter_client starts the "python3" kernel spec (argv "python") with sys.executable,
    # i.e. this venv's interpreter, where meljax is importable.
    client = nbclient.NotebookClient(
        nb, kernel_name="python3", timeout=600, resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()  # raises CellExecutionError on the first failing cell

    errors = [o for c in code_cells(nb) for o in c.outputs if o.output_type == "error"]
    assert not errors
    # meljax was importable: the install cell ran no command.
    assert "$ " not in cell_text(find_cell(nb, "def sh(*cmd)"))
    assert "backend: cpu" in cell_text(find_cell(nb, "jax.devices()"))

    with open(workdir / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1))
    assert all("reward_mean" in r and "mel/generated" in r for r in records)
    assert (workdir / "checkpoints").is_dir() and (workdir / "export").is_dir()

    curves = find_cell(nb, "render_report(WORKDIR)")
    images = [o for o in curves.outputs if "data" in o and "image/png" in o.data]
    assert len(images) == 1
    assert (workdir / "report.png").is_file()
    assert f"steps                          {STEPS} (step 1 to {STEPS})" in cell_text(curves)

    # The notebook's count of kept / generated analyses matches the log file.
    meta_path = workdir / "meta_experiences.jsonl"
    meta = []
    if meta_path.exists():
        meta = [json.loads(line) for line in meta_path.read_text().splitlines() if line.strip()]
    kept = sum(r["kept"] is True for r in meta)
    meta_out = cell_text(find_cell(nb, "read_meta_experiences(WORKDIR)"))
    assert f"{kept} kept of {len(meta)} generated analyses" in meta_out
    assert ("step " in meta_out) if kept else ("No meta-experience was kept" in meta_out)
    assert len(meta) == sum(int(r["mel/generated"]) for r in records)

    evaluation = cell_text(find_cell(nb, "evaluate("))
    # Pass@1 in percent, then its 95% interval.
    assert re.search(r"\| arithmetic \| 3 \| +[\d.]+ \([\d.]+-[\d.]+\) \|", evaluation), evaluation
    assert len(re.findall(r"-> reward (0\.0|1\.0)", evaluation)) == 3
