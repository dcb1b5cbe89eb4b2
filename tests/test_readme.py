"""Every ```python block of README.md runs on its own (its own imports, nothing from the block before).

Each block runs in a fresh namespace, in a directory holding what the README's
commands would have made by then: a trained run ``runs/lenet5-demo`` (a
quick one), ``digit.png`` and ``lenet5.safetensors`` exported from that run.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from PIL import Image

    import gpucnn as gc
    from gpucnn.export import to_safetensors
    from gpucnn.train import TrainConfig, train

    d = tmp_path_factory.mktemp("readme")
    cfg = TrainConfig(model="lenet5", epochs=1, subset=512, test_subset=200, batch_size=32)
    train(cfg, out_dir=d / "runs" / "lenet5-demo", progress=False, log=None)
    digit = gc.data.load_dataset("mnist").test_images[0]
    Image.fromarray(255 - digit).save(d / "digit.png")       # dark ink on white, as drawn
    to_safetensors(gc.load(d / "runs" / "lenet5-demo"), d / "lenet5.safetensors")
    return d


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_python_block_runs_on_its_own(code, workdir, monkeypatch, capsys):
    if "import torch" in code:
        pytest.importorskip("torch")
        pytest.importorskip("safetensors")
    monkeypatch.chdir(workdir)
    exec(compile(code, "README.md", "exec"), {"__name__": "__readme__"})
