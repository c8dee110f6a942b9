"""Overlapped stages (issue 25): ``batch`` reads scan k+1 while scan k is explained, maps are
written in the background. Oracles: the sequential run's files, byte for byte; the
reads counted where they happen; a failing write; ``kill -9`` then a rerun."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from hirescam3d.io import outputs
from hirescam3d.io import scans as io
from hirescam3d.io.scans import OutputError
from hirescam3d.pipeline import explain_scan, stages
from tests.pipeline.test_batch import MODEL, REPO, invoke, log_records, small_scans, temp_leftovers


@pytest.mark.slow
def test_batch_reads_each_scan_once_ahead_and_writes_what_explain_writes(tmp_path, monkeypatch):
    """The first scan is read, and arrays of its size made, while the model loads, each
    later one read once the scan before is in memory; every scan once, in the read-ahead
    thread; the files are those of the sequential pipeline, though the batch reuses one
    scan's arrays for the next."""
    import hirescam3d.cli.batch as cli_batch

    from hirescam3d.pipeline import scan_memory

    paths = small_scans(tmp_path / "scans", 3)
    reads: list[tuple[str, str]] = []
    events: list[str] = []  # "read <name>" when a read begins, "float32 <name>" when done
    real, real_load, real_finish = io.read_stored, cli_batch.load_checked, io.finish_scan
    begun = threading.Semaphore(0)

    def counted(path, series=None):
        reads.append((Path(path).name, threading.current_thread().name))
        events.append(f"read {Path(path).name}")
        begun.release()
        return real(path, series)

    voxels, made = [], []  # addresses: each scan's float32 voxels; arrays made ahead (where)

    def finished(stored, *args):
        scan = real_finish(stored, *args)
        events.append(f"float32 {stored.path.name}")
        voxels.append(scan.array.__array_interface__["data"][0])
        return scan

    real_prepare = scan_memory.ScanMemory.prepare

    def prepare(memory, shape):
        real_prepare(memory, shape)
        made.extend((flat.__array_interface__["data"][0], threading.current_thread().name)
                    for flat in memory.free)  # fmt: skip

    def load_after_the_first_read_began(*args):
        assert begun.acquire(timeout=20), "the first scan was not read while the model loaded"
        return real_load(*args)

    monkeypatch.setattr(io, "read_stored", counted)
    monkeypatch.setattr(io, "finish_scan", finished)
    monkeypatch.setattr(scan_memory.ScanMemory, "prepare", prepare)
    monkeypatch.setattr(cli_batch, "load_checked", load_after_the_first_read_began)
    out = tmp_path / "out"
    args = ("batch", tmp_path / "scans" / "*_ct.nii.gz", "--out", out, "--model", MODEL,
            "-f", "atelectasis", "--method", "hirescam", "--method", "gradcam")  # fmt: skip
    result = invoke(*args)
    assert result.exit_code == 0, result.stderr
    assert Counter(name for name, _ in reads) == {p.name: 1 for p in paths}
    for p in paths:  # the first while the model loaded, the others during the one before
        assert dict(reads)[p.name].startswith("hirescam3d-read-ahead")
    names = sorted(p.name for p in paths)  # the batch's order
    for before, after in zip(names, names[1:], strict=False):
        assert events.index(f"float32 {before}") < events.index(f"read {after}")
    assert len(made) == scan_memory.KEEP
    assert all(thread.startswith("hirescam3d-read-ahead") for _, thread in made)
    assert voxels[0] in {address for address, _ in made}  # the first scan's float32 voxels
    reads.clear()
    monkeypatch.setattr(cli_batch, "load_checked", real_load)
    assert invoke(*args).exit_code == 0
    assert reads == []  # a rerun skips every scan and reads none, not even the first
    assert [r["status"] for r in log_records(out)] == ["ok"] * 3 + ["skipped"] * 3
    # the sequential pipeline (no read-ahead, same writer) gives the same voxels
    for p in paths:
        stem = p.name.split(".")[0]
        direct = tmp_path / "direct" / stem
        explain_scan(p, direct, MODEL, ["atelectasis"], ("hirescam", "gradcam"))
        [folder] = [f for f in out.iterdir() if f.is_dir() and (f / "report.json").exists()
                    and stem in json.loads((f / "report.json").read_text())["input"]["path"]]
        for method in ("hirescam", "gradcam"):
            name = f"{stem}_atelectasis_{method}.nii.gz"
            a = np.asarray(nib.load(str(folder / name)).dataobj)
            b = np.asarray(nib.load(str(direct / name)).dataobj)
            assert np.array_equal(a, b)


def test_a_failed_background_write_fails_the_scan_and_leaves_no_map(tmp_path, monkeypatch):
    [scan] = small_scans(tmp_path / "scans", 1)
    real = outputs.write_map
    calls = []

    def second_fails(path, *args, **kwargs):
        calls.append(threading.current_thread().name)
        if len(calls) == 2:
            raise OutputError(f"cannot write {path}: No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_map", second_fails)
    out = tmp_path / "out"
    result = invoke("batch", tmp_path / "scans" / "*_ct.nii.gz", "--out", out, "--model", MODEL,
                    "-f", "atelectasis", "--method", "hirescam", "--method", "gradcam")  # fmt: skip
    assert result.exit_code == 1
    assert all(name.startswith("hirescam3d-writer") for name in calls)  # in the background
    [record] = log_records(out)
    assert record["status"] == "failed" and "No space left" in record["error"]
    assert list(out.rglob("*.nii.gz")) == [] and temp_leftovers(out) == []
    monkeypatch.setattr(outputs, "write_map", real)  # the disk has room again: resumable
    result = invoke("batch", tmp_path / "scans" / "*_ct.nii.gz", "--out", out, "--model", MODEL,
                    "-f", "atelectasis", "--method", "hirescam", "--method", "gradcam")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert [r["status"] for r in log_records(out)] == ["failed", "ok"]
    assert len(list(out.rglob("*.nii.gz"))) == 2


def test_writer_keeps_order_bounds_work_and_raises_where_asked():
    order, running, peak = [], [0], [0]

    def job(i):
        running[0] += 1
        peak[0] = max(peak[0], running[0])
        time.sleep(0.01)
        order.append(i)
        running[0] -= 1

    with stages.background_writer() as writer:
        for i in range(5):
            writer.submit(job, i)
    assert order == list(range(5)) and peak[0] == 1

    def boom():
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"), stages.background_writer() as writer:
        writer.submit(boom)
        writer.submit(job, 9)  # the failure of the job before surfaces here
    assert 9 not in order


def test_read_ahead_holds_reads_back_until_the_scan_is_in_memory():
    calls: list[str] = []

    def read(name):
        calls.append(name)
        return name.upper()

    with stages.read_ahead() as ahead:
        ahead.start({"a": (read, ("a",))})
        ahead.start({"b": (read, ("b",))})
        assert stages.read("a", str.lower, "A") == "A"
        ahead.start_after_read({"c": (read, ("c",))})
        time.sleep(0.2)
        assert stages.read("b", str.lower, "B") == "B" and "c" not in calls
        stages.scan_in_memory()  # the pipeline's call once the scan is float32
        assert stages.read("c", str.lower, "C") == "C"
        ahead.start_after_read({"d": (read, ("d",))})
        ahead.release()  # what batch calls after a scan that failed or was skipped
        assert stages.read("d", str.lower, "D") == "D"
    assert calls == ["a", "b", "c", "d"]


def test_read_ahead_keeps_the_current_and_the_next_scan_only():
    with stages.read_ahead() as ahead:
        ahead.start({"a": (str.upper, ("a",))})
        ahead.start({"b": (str.upper, ("b",))})
        ahead.start({"c": (str.upper, ("c",))})  # "a" was never taken: dropped
        assert stages.read("a", str.lower, "A") == "a"  # read again, not from the slot
        assert stages.read("b", str.lower, "B") == "B"
        assert stages.read("c", str.lower, "C") == "C"

        def bad():
            raise ValueError("corrupt")

        ahead.start({"d": (bad, ())})
        with pytest.raises(ValueError, match="corrupt"):  # raised where it is read
            stages.read("d", str.lower, "D")
    assert stages.read("x", str.upper, "x") == "X"  # no read-ahead outside the block


@pytest.mark.slow
def test_kill_9_during_an_overlapped_batch_then_rerun_does_every_scan_once(tmp_path):
    small_scans(tmp_path / "scans", 4)
    out = tmp_path / "out"
    shim = tmp_path / "run_cli.py"
    shim.write_text("import sys, hirescam3d\n"
                    f"hirescam3d.__path__.append({str(REPO)!r})\n"
                    "from hirescam3d.cli.main import main\nmain()\n")  # fmt: skip
    command = [sys.executable, str(shim), "batch", str(tmp_path / "scans" / "*_ct.nii.gz"),
               "--out", str(out),
               "--model", MODEL, "-f", "atelectasis", "--method", "hirescam", "--method",
               "gradcam", "--device", "cpu", "--quiet"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while not list(out.glob("*/batch_done.json")) and time.monotonic() < deadline:
        time.sleep(0.05)  # the first scan done: the second is explained, the third read
    time.sleep(0.3)
    assert proc.poll() is None, "the batch ended before the kill: no kill test"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    records = log_records(out)
    ok = Counter(r["id"] for r in records if r["status"] == "ok")
    assert max(ok.values()) == 1  # no scan was completed twice over both runs
    folders = [f for f in out.iterdir() if f.is_dir() and not f.name.startswith(".")]
    assert len(folders) == 4 and {f.name for f in folders} >= set(ok)
    assert temp_leftovers(out) == []
    for folder in folders:  # every scan done, with every output it lists
        marker = json.loads((folder / "batch_done.json").read_text())
        assert marker["status"] == "ok" and len(marker["outputs"]) == 3
        for name in marker["outputs"]:
            assert (folder / name).exists()
        skipped = [r for r in records if r["id"] == folder.name and r["status"] == "skipped"]
        assert ok[folder.name] == 1 or skipped  # done by the first run, not redone


def test_warnings_of_a_read_ahead_are_raised_where_the_scan_is_read():
    import warnings

    started, release = threading.Event(), threading.Event()

    def noisy(name):
        started.set()
        release.wait(5)
        warnings.warn(f"{name} does not look like HU", UserWarning, stacklevel=1)
        return name

    with stages.read_ahead() as ahead:
        ahead.start({"k1": (noisy, ("scan1",))})
        started.wait(5)
        with warnings.catch_warnings(record=True) as during:  # scan 0 being explained
            warnings.simplefilter("always")
            release.set()
            warnings.warn("scan0 own warning", UserWarning, stacklevel=1)
            time.sleep(0.2)  # the read ahead warns now, in its thread
        assert [str(w.message) for w in during] == ["scan0 own warning"]
        with warnings.catch_warnings(record=True) as taken:
            warnings.simplefilter("always")
            assert stages.read("k1", str.upper, "x") == "scan1"
        assert [str(w.message) for w in taken] == ["scan1 does not look like HU"]


def test_reused_map_buffers_are_never_overwritten_while_written(tmp_path, monkeypatch):
    """Maps are placed into two arrays used in turn while the one before is written, the
    first in the scan's own voxels. A slow writer checks that its map did not change during
    its write; the files equal those of a run that places every map into a fresh array."""
    import hashlib

    from hirescam3d.pipeline import write as pipeline_write

    [scan] = small_scans(tmp_path / "scans", 1)
    findings, methods = ["atelectasis", "pleural_effusion", "cardiomegaly"], ("hirescam", "gradcam")
    real, changed = outputs.write_map, []
    release, spares = pipeline_write._release_voxels, []
    monkeypatch.setattr(pipeline_write, "_release_voxels",
                        lambda *a: spares.append(release(*a)) or spares[-1])  # fmt: skip

    def slow_checked(path, volume, *args, **kwargs):
        before = hashlib.sha256(np.ascontiguousarray(volume)).hexdigest()
        time.sleep(0.05)  # the next map is placed meanwhile
        result = real(path, volume, *args, **kwargs)
        changed.append(hashlib.sha256(np.ascontiguousarray(volume)).hexdigest() != before)
        return result

    monkeypatch.setattr(outputs, "write_map", slow_checked)
    explain_scan(scan, tmp_path / "reused", MODEL, findings, methods)
    assert len(changed) == 6 and not any(changed)
    assert len(spares) == 1 and spares[0] is not None  # the scan's voxels held a map
    monkeypatch.setattr(outputs, "write_map", real)
    monkeypatch.setattr(pipeline_write._TwoBuffers, "next", lambda self: None)
    explain_scan(scan, tmp_path / "fresh", MODEL, findings, methods)
    for path in (tmp_path / "fresh").glob("*.nii.gz"):
        a = np.asarray(nib.load(str(path)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "reused" / path.name)).dataobj)
        assert np.array_equal(a, b), path.name


def test_the_scans_voxels_hold_a_map_only_when_nothing_else_sees_them():
    """The scan's float32 voxels become a map buffer only if no view or tensor of them is
    left (either would see the maps); the scan's array is emptied either way."""
    import torch

    from hirescam3d.pipeline.write import _release_voxels

    class Scan:
        array = None

    scan, shape = Scan(), (4, 5, 6)
    scan.array = np.ones(shape, np.float32)
    assert _release_voxels(scan, shape) is not None and scan.array.size == 0
    for keep in (lambda a: a[1:], torch.from_numpy, lambda a: a):
        scan.array = np.ones(shape, np.float32)
        held = keep(scan.array)
        assert _release_voxels(scan, shape) is None and scan.array.size == 0
        del held
    for make in (lambda: np.ones(shape, np.float64), lambda: np.ones((4, 5, 7), np.float32),
                 lambda: np.ones(shape, np.float32, order="F")):  # fmt: skip
        scan.array = make()  # held by the scan alone: refused for its kind
        assert _release_voxels(scan, shape) is None


def _batch_args(tmp_path: Path, out: Path) -> tuple:
    return ("batch", tmp_path / "scans" / "*_ct.nii.gz", "--out", out, "--model", MODEL,
            "-f", "atelectasis", "--method", "hirescam", "--method", "gradcam")  # fmt: skip


@pytest.mark.slow
def test_a_scan_ends_on_the_writer_while_the_next_is_explained(tmp_path, monkeypatch):
    """Scan k's last map is still being written, and its outputs not yet in place, when
    scan k+1 is in memory; its array is kept for the next scan all the same; the records
    keep the batch's order and the files are those of the sequential pipeline. Oracle:
    events logged where they happen, array addresses, nibabel."""
    from hirescam3d.io.staging import Staging

    paths = sorted(small_scans(tmp_path / "scans", 3), key=lambda p: p.name)
    stems = [p.name.split(".")[0] for p in paths]
    events: list[tuple[str, str]] = []  # (what, thread)
    next_in_memory = {stem: threading.Event() for stem in stems}
    real_write, real_finish, real_commit = outputs.write_map, io.finish_scan, Staging.commit

    def write_map(path, *args, **kwargs):
        stem = next(s for s in stems if Path(path).name.startswith(s))
        if Path(path).name.endswith("_gradcam.nii.gz") and stem != stems[-1]:  # its last map
            events.append((f"last map of {stem} waits", threading.current_thread().name))
            assert next_in_memory[stem].wait(30), f"{stem}'s end held up the next scan"
        return real_write(path, *args, **kwargs)

    def finish_scan(stored, *args):
        scan = real_finish(stored, *args)
        stem = stored.path.name.split(".")[0]
        events.append((f"{stem} in memory", threading.current_thread().name))
        i = stems.index(stem)
        if i > 0:
            next_in_memory[stems[i - 1]].set()
        return scan

    def commit(stage, written, *args):
        stem = next(s for s in stems if any(Path(p).name.startswith(s) for p in written.values()))
        events.append((f"{stem} committed", threading.current_thread().name))
        return real_commit(stage, written, *args)

    from hirescam3d.pipeline import scan_memory

    real_empty, handed = scan_memory.ScanMemory.empty, set()

    def empty(memory, shape, order):
        array = real_empty(memory, shape, order)
        handed.add(array.__array_interface__["data"][0])
        return array

    monkeypatch.setattr(outputs, "write_map", write_map)
    monkeypatch.setattr(io, "finish_scan", finish_scan)
    monkeypatch.setattr(Staging, "commit", commit)
    monkeypatch.setattr(scan_memory.ScanMemory, "empty", empty)
    out = tmp_path / "out"
    result = invoke(*_batch_args(tmp_path, out))
    assert result.exit_code == 0, result.stderr
    assert len(handed) == scan_memory.KEEP  # the last map's array came back from the writer
    what = [w for w, _ in events]
    for before, after in zip(stems, stems[1:], strict=False):
        assert what.index(f"{after} in memory") < what.index(f"{before} committed")
    assert all(t.startswith("hirescam3d-writer") for w, t in events if "committed" in w)
    records = log_records(out)
    assert [(r["id"], r["status"]) for r in records] == [(s, "ok") for s in stems]
    for stem, path in zip(stems, paths, strict=True):
        direct = tmp_path / "direct" / stem
        explain_scan(path, direct, MODEL, ["atelectasis"], ("hirescam", "gradcam"))
        for method in ("hirescam", "gradcam"):
            name = f"{stem}_atelectasis_{method}.nii.gz"
            a = np.asarray(nib.load(str(out / stem / name)).dataobj)
            assert np.array_equal(a, np.asarray(nib.load(str(direct / name)).dataobj))
    assert temp_leftovers(out) == [] and not list(out.glob("*/.tmp-*"))


@pytest.mark.slow
def test_a_failed_last_write_fails_its_scan_only_and_its_warnings_stay_with_it(
    tmp_path, monkeypatch
):
    """The first scan's last map fails on the writer after the second scan began: the first
    is failed (no map, no staging folder left), the second is done; a warning raised while
    the first scan's map was written is that scan's, not the next one's."""
    paths = sorted(small_scans(tmp_path / "scans", 2), key=lambda p: p.name)
    first, second = (p.name.split(".")[0] for p in paths)
    real = outputs.write_map

    def write_map(path, *args, **kwargs):
        name = Path(path).name
        if name.startswith(first) and name.endswith("_hirescam.nii.gz"):
            warnings.warn(f"{name}: a warning of the first scan", io.ScanWarning, stacklevel=1)
        if name.startswith(first) and name.endswith("_gradcam.nii.gz"):
            raise OutputError(f"cannot write {path}: No space left on device")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(outputs, "write_map", write_map)
    out = tmp_path / "out"
    result = invoke(*_batch_args(tmp_path, out))
    assert result.exit_code == 1
    records = log_records(out)
    assert [(r["id"], r["status"]) for r in records] == [(first, "failed"), (second, "ok")]
    assert "No space left" in records[0]["error"]
    assert not any("first scan" in w for w in records[1]["warnings"])
    assert result.stderr.count("a warning of the first scan") == 1
    assert not (out / first).exists() and len(list((out / second).glob("*.nii.gz"))) == 2
    assert temp_leftovers(out) == [] and not list(out.glob("*/.tmp-*"))
