"""The one-command recipe of ``demo_seg``: its stages chain each one's weights into the
next, and a rerun keeps the stages that finished. ``train_seg.main`` is replaced by a
stand-in that records its arguments and writes the metadata a finished run writes."""

from __future__ import annotations

import json
from pathlib import Path

from hirescam3d.models.training import seg_recipe, train_seg


def _fake_train(calls: list[list[str]], fail_at: str | None = None):
    def main(argv: list[str]) -> int:
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        if fail_at is not None and out.name == fail_at:
            raise KeyboardInterrupt  # killed mid-stage: nothing finished
        (out / "configs").mkdir(parents=True)
        meta = {"hirescam3d": {"training": {"steps": 5, "steps_completed": 5}}}
        (out / "configs" / "metadata.json").write_text(json.dumps(meta))
        return 0

    return main


def test_stages_chain_their_weights_and_only_the_last_chooses_the_postprocessing(
    tmp_path, monkeypatch
):
    calls: list[list[str]] = []
    monkeypatch.setattr(train_seg, "main", _fake_train(calls))
    monkeypatch.setattr(seg_recipe, "write_readme", lambda bundle: None)
    out = tmp_path / "demo_seg"
    assert seg_recipe.main(["--out", str(out)]) == 0
    names = [name for name, _ in seg_recipe.STAGES]
    work = tmp_path / "demo_seg.stages"
    assert [c[c.index("--out") + 1] for c in calls] == [
        *(str(work / n) for n in names[:-1]), str(out)
    ]
    assert "--init" not in calls[0]
    for before, call in zip(calls[:-1], calls[1:], strict=True):
        assert call[call.index("--init") + 1] == before[before.index("--out") + 1]
    assert all("--val-count" in c for c in calls[:-1]) and "--val-count" not in calls[-1]
    recipe = json.loads((out / "configs" / "metadata.json").read_text())["hirescam3d"][
        "training"
    ]["recipe"]
    assert recipe["command"] == f"{seg_recipe.COMMAND} --out {out}"
    assert len(recipe["stages"]) == len(names)


def test_a_rerun_keeps_the_finished_stages_and_redoes_the_killed_one(tmp_path, monkeypatch):
    out = tmp_path / "demo_seg"
    second = seg_recipe.STAGES[1][0]
    calls: list[list[str]] = []
    monkeypatch.setattr(train_seg, "main", _fake_train(calls, fail_at=second))
    try:
        seg_recipe.main(["--out", str(out)])
    except KeyboardInterrupt:
        pass
    (tmp_path / "demo_seg.stages" / second / "partial").mkdir(parents=True)  # left by the kill
    calls.clear()
    monkeypatch.setattr(train_seg, "main", _fake_train(calls))
    monkeypatch.setattr(seg_recipe, "write_readme", lambda bundle: None)
    assert seg_recipe.main(["--out", str(out)]) == 0
    outs = [Path(c[c.index("--out") + 1]).name for c in calls]
    assert outs[0] == second  # the first stage was kept, the killed one redone
    assert not (tmp_path / "demo_seg.stages" / second / "partial").exists()
