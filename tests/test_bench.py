"""gpucnn bench runs end to end on the CPU (timings themselves are never asserted)."""
from __future__ import annotations

import json

import pytest

from gpucnn import bench


def test_step_table_with_torch_reference(capsys, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--batch-sizes", "8", "--repeats", "2", "--warmup", "1",
                     "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "forward+loss+backward+SGD" in text and "x " in text  # a ratio was printed
    assert "0:Conv2D+ReLU+MaxPool2D(1, 28, 28)" in text and "7:Dense+ReLU(400,)" in text
    result = json.loads(out.read_text())
    assert result["steps"][0]["batch"] == 8 and result["steps"][0]["torch_s"] > 0


@pytest.mark.parametrize("model", ["zhang2016", "seed002_c2"])
def test_first_losses_agree_with_torch_for_other_models(model, capsys):
    pytest.importorskip("torch")
    assert bench.main(["--device", "cpu", "--model", model, "--batch-sizes", "4", "--repeats", "1",
                       "--warmup", "0", "--no-layers"]) == 0


def test_time_to_accuracy_reports_each_seed(capsys):
    rc = bench.main(["--device", "cpu", "--time-to-accuracy", "0.5", "--seeds", "2",
                     "--eval-every", "20", "--no-torch"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "seed 0: 50.00% after" in text and "seed 1:" in text and "mean" in text


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be >= 1, got 0"),
    (["--repeats", "0"], "need --repeats >= 1"),
    (["--time-to-accuracy", "1.5"], "need 0 < --time-to-accuracy < 1"),
])
def test_bad_arguments(argv, message, capsys):
    assert bench.main(["--device", "cpu", "--no-torch"] + argv) == 2
    assert message in capsys.readouterr().err
