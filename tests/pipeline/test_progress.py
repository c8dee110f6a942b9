"""Progress reports (issue 25): sliding windows counted as MONAI runs them, and the
batch bar's scans per minute and time left."""

from __future__ import annotations

import io

import pytest
import torch
from monai.inferers import sliding_window_inference
from rich.console import Console

from hirescam3d import Explainer
from hirescam3d.core.sliding import sliding_window_explain
from tests.core.test_sliding_window import box, make
from tests.pipeline.test_batch import MODEL, _import, batch, invoke, touch

console = _import("hirescam3d.cli.console")


@pytest.mark.parametrize(("shape", "roi", "overlap", "sw"), [
    ((20, 12, 28), (16, 16, 16), 0.5, 3),
    ((40, 30), (16, 16), 0.25, 1),
])  # fmt: skip
@pytest.mark.parametrize("region", ["mask", "predicted"])
def test_window_progress_counts_the_windows_monai_runs(shape, roi, overlap, sw, region):
    net, x = make(shape)
    seen: list[int] = []  # the oracle: MONAI's own calls of a predictor

    def predictor(window):
        seen.append(window.shape[0])
        return net(window)

    with torch.no_grad():
        out = sliding_window_inference(x, roi, sw, predictor, overlap=overlap)
    target = int(out[0].argmax(0).flatten().mode().values)  # a class the model predicts
    windows = sum(seen)
    calls: list[tuple[int, int]] = []
    mask = box(shape, *((0, s // 2) for s in shape)) if region == "mask" else "predicted"
    explainer = Explainer(net, "features", "hirescam", task="softmax")
    sliding_window_explain(explainer, x, targets=[target], region=mask, roi_size=roi,
                           overlap=overlap, sw_batch_size=sw,
                           progress=lambda d, t: calls.append((d, t)))  # fmt: skip
    passes = 2 if region == "predicted" else 1
    assert len(calls) == passes * len(seen)
    assert {t for _, t in calls} == {passes * windows}
    done = [d for d, _ in calls]
    assert done == sorted(done) and done[-1] == passes * windows
    assert [b - a for a, b in zip([0, *done], done, strict=False)] == seen * passes


def test_throughput_text():
    # 3 scans in 90 s: 2 per minute; 7 left take 210 s
    assert console.throughput(3, 90.0, 7) == "2.0 scans/min, 0:03:30 left"
    assert console.throughput(1, 7200.0, 2) == "0.0 scans/min, 4:00:00 left"
    assert console.throughput(0, 0.0, 5) == ""


def test_batch_bar_shows_rate_and_time_left(tmp_path, monkeypatch):
    """On a terminal the batch bar shows scans/min and the time left after each scan."""
    from tests.pipeline.test_batch import FakeExplain

    buffer = io.StringIO()
    terminal = Console(file=buffer, force_terminal=True, width=200)
    monkeypatch.setattr(console, "err_console", lambda: terminal)
    monkeypatch.setattr(batch, "run_pipeline", FakeExplain())
    folder = tmp_path / "scans"
    for name in ("a", "b"):
        touch(folder / f"{name}.nii.gz")
    result = invoke("batch", folder, "--out", tmp_path / "out", "--model", MODEL,
                    "-f", "atelectasis")  # fmt: skip
    assert result.exit_code == 0, result.output
    shown = buffer.getvalue()
    assert "2/2" in shown and "scans/min" in shown and "0:00:00 left" in shown
