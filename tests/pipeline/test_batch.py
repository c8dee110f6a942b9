"""``hirescam3d batch``: inputs, resumability, failure logging, atomic files, torchrun shards.

Bookkeeping tests replace the pipeline by a fast fake; one test runs the real pipeline
in-process and one (slow) runs two CPU ranks under torchrun.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import pytest
from typer.testing import CliRunner

import hirescam3d
from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.errors import ScanError
from hirescam3d.io.scans import OutputError
from tests.conftest import installed_console_script

REPO = Path(__file__).resolve().parents[2]
MODEL = "axialnet_tiny"
SHAPE, SPACING = (48, 64, 64), (6.0, 5.0, 5.0)


def _import(name: str):
    """A ``hirescam3d.cli`` module; in a source checkout without ``pip install -e .`` the
    subpackage (folder ``cli/``, mapped by pyproject) is made importable by hand."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError:
        hirescam3d.__path__.append(str(REPO))
        return importlib.import_module(name)


cli_main = _import("hirescam3d.cli.main")
batch = _import("hirescam3d.cli.batch")
errors = _import("hirescam3d.cli.errors")
runner = CliRunner()


def invoke(*args):
    return runner.invoke(cli_main.app, [str(a) for a in args], catch_exceptions=False)


def log_records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "batch_log.jsonl").read_text().splitlines()]


def temp_leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if ".tmp" in p.name or p.name.startswith(".sample-")]


# -- inputs -------------------------------------------------------------------------------
def touch(path: Path, data: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_folders_globs_and_manifests(tmp_path):
    a = touch(tmp_path / "scans" / "a.nii.gz")
    b = touch(tmp_path / "scans" / "b.nrrd")
    touch(tmp_path / "scans" / "notes.txt")
    touch(tmp_path / "scans" / ".hidden.nii.gz")
    c = touch(tmp_path / "scans" / "more" / "c.mha")
    series = tmp_path / "scans" / "series"
    touch(series / "1.dcm")
    touch(series / "2.dcm")
    found = [s.path for s in batch.collect_inputs([str(tmp_path / "scans")])]
    assert found == [a, b, c, series]  # a DICOM folder is one scan

    found = batch.collect_inputs([str(tmp_path / "scans" / "*.n*"), str(a)])
    assert [s.path for s in found] == [a, b]  # the repeated file is kept once

    manifest = tmp_path / "list.csv"
    manifest.write_text("id,path,region\npatient 1,scans/a.nii.gz,m/a.nii.gz\n,/abs/x.nii.gz,\n")
    assert batch.collect_inputs([str(manifest)]) == [
        (tmp_path / "scans" / "a.nii.gz", "patient 1", tmp_path / "m" / "a.nii.gz"),
        (Path("/abs/x.nii.gz"), None, None),
    ]


@pytest.mark.parametrize(
    ("setup", "fragment"),
    [
        (lambda d: str(d / "missing.nii.gz"), "no such file"),
        (lambda d: str(d / "*.nrrd"), "no files match"),
        (lambda d: str(touch(d / "empty" / "readme.txt").parent), "holds no scans"),
        (lambda d: str(touch(d / "m.csv", b"file,id\na.nii.gz,1\n")), "no 'path' column"),
        (lambda d: str(touch(d / "n.csv", b"path\n")), "no rows"),
    ],
)
def test_bad_inputs_are_usage_errors(tmp_path, setup, fragment):
    with pytest.raises(errors.CLIUsageError, match=fragment):
        batch.collect_inputs([setup(tmp_path)])


def test_ids_are_unique_and_safe():
    items = batch.assign_ids(
        [
            (Path("x/ct.nii.gz"), None),
            (Path("y/ct.nii.gz"), None),
            (Path("ct.nrrd"), None),
            (Path("z.nii"), "patient 1/a"),
            (Path("dicom/series_7"), None),
        ]
    )
    assert [i.id for i in items] == ["ct", "ct_2", "ct_3", "patient_1_a", "series_7"]
    assert [i.index for i in items] == [0, 1, 2, 3, 4]


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_shards_partition_the_items(world_size):
    items = batch.assign_ids([(Path(f"s{i}.nii.gz"), None) for i in range(10)])
    shards = [batch.shard(items, r, world_size) for r in range(world_size)]
    indices = sorted(i.index for s in shards for i in s)
    assert indices == list(range(10))  # every item exactly once
    for rank, share in enumerate(shards):
        assert all(i.index % world_size == rank for i in share)


def test_not_distributed_without_torchrun_env(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    dist = batch.Distributed("cpu")
    assert (dist.rank, dist.world_size, dist.active) == (0, 1, False)
    assert dist.total(3) == 3 and dist.broadcast("x") == "x"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert batch.Distributed("cpu").active is False


# -- bookkeeping with a fake pipeline -----------------------------------------------------
class FakeExplain:
    """Writes two small files atomically per item like explain_scan; fails on 'bad' stems."""

    def __init__(self):
        self.calls: list[str] = []

    def __call__(self, path, folder, opts, loaded, progress=None, defer=False):
        stem = Path(path).name.split(".")[0]
        self.calls.append(stem)
        if "bad" in stem:
            Path(folder).mkdir(parents=True, exist_ok=True)  # as explain_scan does
            raise ScanError(f"{path}: the image data is truncated or corrupt")
        targets = {
            f"{f}/{m}": Path(folder) / f"{stem}_{f}_{m}.nii.gz"
            for f in opts.findings or ["atelectasis"]
            for m in opts.methods
        }
        targets["report"] = Path(folder) / "report.json"
        for target in targets.values():
            if target.exists() and not opts.force:
                raise OutputError(f"{target} already exists")
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.tmp")
            tmp.write_text(stem)
            os.replace(tmp, target)
        result = SimpleNamespace(
            findings=list(opts.findings or ["atelectasis"]),
            probabilities={"atelectasis": 0.9},
            warnings=[],
            report={"timings_s": {"total_s": 0.01}},
        )
        if defer:  # as explain_scan(defer=True): the end runs on the batch's writer
            return SimpleNamespace(finish=lambda: (result, targets), warnings=[])
        return result, targets


@pytest.fixture
def fake(monkeypatch):
    explain = FakeExplain()
    monkeypatch.setattr(batch, "run_pipeline", explain)
    return explain


@pytest.fixture
def scans(tmp_path) -> Path:
    folder = tmp_path / "scans"
    for name in ("a", "bad", "c"):
        touch(folder / f"{name}.nii.gz")
    return folder


def test_a_failing_item_is_logged_and_does_not_stop_the_batch(fake, scans, tmp_path):
    out = tmp_path / "out"
    result = invoke("batch", scans, "--out", out, "--model", MODEL, "-f", "atelectasis")
    assert result.exit_code == 1
    assert fake.calls == ["a", "bad", "c"]
    records = log_records(out)
    assert [(r["id"], r["status"]) for r in records] == [
        ("a", "ok"),
        ("bad", "failed"),
        ("c", "ok"),
    ]
    failed = records[1]
    assert "truncated or corrupt" in failed["error"] and failed["error_type"] == "ScanError"
    assert failed["input"] == str(scans / "bad.nii.gz")
    for r in records:
        assert r["seconds"] >= 0 and r["started"] <= r["finished"]
        assert (r["rank"], r["world_size"]) == (0, 1)
    assert len({r["run"] for r in records}) == 1
    errors_shown = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors_shown) == 1 and "bad.nii.gz" in errors_shown[0]
    assert "3 items: 2 explained" in result.stdout and "1 failed" in result.stdout
    for name in ("a", "c"):
        marker = json.loads((out / name / "batch_done.json").read_text())
        assert marker["status"] == "ok"
        assert marker["outputs"] == sorted([f"{name}_atelectasis_hirescam.nii.gz", "report.json"])
    assert not (out / "bad").exists()  # the failed item leaves no empty folder
    assert not (out / ".batch_logs").exists()
    assert temp_leftovers(out) == []


def test_rerun_skips_done_items_and_retries_failed_ones(fake, scans, tmp_path):
    out = tmp_path / "out"
    invoke("batch", scans, "--out", out, "--model", MODEL)
    done = {p: p.stat().st_mtime_ns for p in (out / "a").iterdir()}
    fake.calls.clear()
    result = invoke("batch", scans, "--out", out, "--model", MODEL)
    assert result.exit_code == 1
    assert fake.calls == ["bad"]
    assert {p: p.stat().st_mtime_ns for p in (out / "a").iterdir()} == done
    records = log_records(out)
    assert len(records) == 6  # the log keeps both runs
    second = [r for r in records if r["run"] == records[-1]["run"]]
    assert [(r["id"], r["status"]) for r in second] == [
        ("a", "skipped"),
        ("bad", "failed"),
        ("c", "skipped"),
    ]
    assert "2 skipped (done earlier)" in result.stdout

    (scans / "bad.nii.gz").rename(scans / "fixed.nii.gz")
    fake.calls.clear()
    result = invoke("batch", scans, "--out", out, "--model", MODEL, "--quiet")
    assert result.exit_code == 0 and result.stdout == ""
    assert fake.calls == ["fixed"]


def test_force_redoes_done_items(fake, scans, tmp_path):
    out = tmp_path / "out"
    invoke("batch", scans, "--out", out, "--model", MODEL)
    fake.calls.clear()
    assert invoke("batch", scans, "--out", out, "--model", MODEL, "--force").exit_code == 1
    assert fake.calls == ["a", "bad", "c"]


def test_interrupted_items_are_redone(fake, scans, tmp_path):
    out = tmp_path / "out"
    (scans / "bad.nii.gz").unlink()
    invoke("batch", scans, "--out", out, "--model", MODEL)
    # a: interrupted before its marker was written; c: an output vanished since.
    (out / "a" / "batch_done.json").unlink()
    (out / "c" / "c_atelectasis_hirescam.nii.gz").unlink()
    fake.calls.clear()
    result = invoke("batch", scans, "--out", out, "--model", MODEL)
    assert result.exit_code == 0
    assert fake.calls == ["a", "c"]
    assert (out / "a" / "batch_done.json").is_file()
    assert (out / "c" / "c_atelectasis_hirescam.nii.gz").is_file()


def test_items_done_with_other_options_are_not_overwritten(fake, scans, tmp_path):
    out = tmp_path / "out"
    (scans / "bad.nii.gz").unlink()
    invoke("batch", scans, "--out", out, "--model", MODEL, "-f", "atelectasis")
    fake.calls.clear()
    result = invoke("batch", scans, "--out", out, "--model", MODEL, "-f", "nodule", "--json")
    assert result.exit_code == 0
    assert fake.calls == []
    records = json.loads(result.stdout)  # --json: the run's records and nothing else
    assert [r["status"] for r in records] == ["skipped", "skipped"]
    assert all("--force" in r["note"] for r in records)
    result = invoke("batch", scans, "--out", out, "--model", MODEL, "-f", "nodule")
    assert "with other options: --force redoes them" in result.stdout


def test_leftover_rank_logs_of_an_interrupted_run_are_kept(fake, scans, tmp_path):
    out = tmp_path / "out"
    old = {"run": "earlier", "index": 7, "status": "ok", "id": "old", "rank": 1}
    touch(out / ".batch_logs" / "rank-1.jsonl", (json.dumps(old) + "\n").encode())
    invoke("batch", scans, "--out", out, "--model", MODEL)
    records = log_records(out)
    assert records[0] == old
    assert len(records) == 4
    assert not (out / ".batch_logs").exists()


def test_a_repeated_fold_does_not_duplicate_records(tmp_path):
    records = [{"run": "r1", "rank": r, "index": i, "status": "ok"} for r, i in ((0, 0), (1, 1))]
    for record in records:
        touch(
            tmp_path / ".batch_logs" / f"rank-{record['rank']}.jsonl",
            (json.dumps(record) + "\n").encode(),
        )
    saved = {p: p.read_bytes() for p in (tmp_path / ".batch_logs").iterdir()}
    assert batch.fold_rank_logs(tmp_path) == records
    # Crash between writing the log and deleting the rank files: fold again.
    (tmp_path / ".batch_logs").mkdir()
    for path, data in saved.items():
        path.write_bytes(data)
    assert batch.fold_rank_logs(tmp_path) == []
    assert log_records(tmp_path) == records


def test_batch_usage_errors_stop_before_any_work(fake, scans, tmp_path):
    out = tmp_path / "out"
    result = invoke("batch", scans, tmp_path / "nope.nii.gz", "--out", out, "--model", MODEL)
    assert result.exit_code == 2 and "nope.nii.gz" in result.stderr
    result = invoke("batch", scans, "--out", out, "--model", MODEL, "-f", "pneumonia")
    assert result.exit_code == 2 and "atelectasis" in result.stderr
    result = invoke("batch", scans, "--out", out, "--model", "nonet")
    assert result.exit_code == 2 and "unknown model" in result.stderr
    assert fake.calls == [] and not out.exists()


def test_unwritable_batch_output_folder(fake, scans, tmp_path):
    blocker = touch(tmp_path / "a_file")
    result = invoke("batch", scans, "--out", blocker / "out", "--model", MODEL)
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(blocker) in lines[0]
    assert fake.calls == []


# -- the real pipeline --------------------------------------------------------------------
def small_scans(folder: Path, n: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in range(n):
        ct = make_chest_ct(seed, findings=("atelectasis",), shape=SHAPE, spacing=SPACING)
        paths.append(ct.save(folder, f"p{seed}")["ct"])
    return paths


def test_batch_with_the_real_pipeline(tmp_path):
    paths = small_scans(tmp_path / "scans", 1)
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,id\n{paths[0]},first\n")
    out = tmp_path / "out"
    result = invoke("batch", manifest, "--out", out, "--model", MODEL, "-f", "atelectasis")
    assert result.exit_code == 0, result.stderr
    img = nib.load(str(out / "first" / "p0_ct_atelectasis_hirescam.nii.gz"))
    assert img.shape == SHAPE
    report = json.loads((out / "first" / "report.json").read_text())
    assert report["explained"] == ["atelectasis"]
    [record] = log_records(out)
    assert record["status"] == "ok" and record["explained"] == ["atelectasis"]
    assert set(record["probabilities"]) == set(report["findings"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_do_every_item_once(tmp_path):
    small_scans(tmp_path / "scans", 4)
    out = tmp_path / "out"
    if installed_console_script() is not None:
        target = ["-m", "hirescam3d.cli.main"]
    else:  # source checkout: import the cli/ folder as hirescam3d.cli by hand
        shim = tmp_path / "run_cli.py"
        shim.write_text(
            "import sys, hirescam3d\n"
            f"hirescam3d.__path__.append({str(REPO)!r})\n"
            "from hirescam3d.cli.main import main\n"
            "main()\n"
        )
        target = [str(shim)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    pattern = str(tmp_path / "scans" / "*_ct.nii.gz")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--master-port",
        str(free_port()),
        *target,
        "batch",
        pattern,
        "--out",
        str(out),
        "--model",
        MODEL,
        "-f",
        "atelectasis",
        "--device",
        "cpu",
    ]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=500, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = log_records(out)
    assert sorted(r["index"] for r in records) == [0, 1, 2, 3]  # each item exactly once
    for r in records:
        assert r["status"] == "ok"
        assert r["world_size"] == 2 and r["rank"] == r["index"] % 2
    assert len({r["run"] for r in records}) == 1
    for seed in range(4):
        assert (out / f"p{seed}_ct" / "batch_done.json").is_file()
        img = nib.load(str(out / f"p{seed}_ct" / f"p{seed}_ct_atelectasis_hirescam.nii.gz"))
        assert img.shape == SHAPE
    assert not (out / ".batch_logs").exists()
    assert temp_leftovers(out) == []
