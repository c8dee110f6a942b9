"""``hirescam3d batch``: explain many scans, resumably, optionally sharded over torchrun ranks.

Layout of ``OUT``::

    OUT/<item-id>/<stem>_<finding>_<method>.nii.gz, report.json   (from explain_scan)
    OUT/<item-id>/batch_done.json     written (atomically) after all outputs are in place
    OUT/batch_log.jsonl               one JSON record per item and run (appended at the end)
    OUT/.batch_logs/rank-<r>.jsonl    this run's records of rank r while the run is going

An item is done when its ``batch_done.json`` exists, lists outputs that all exist, and
was written with the same options; done items are skipped unless ``--force``. Leftovers
of an interrupted item (no marker) are replaced. Every file here is written to a
temporary name and renamed, so an interrupted run leaves no partial file.

Under ``torchrun --nproc-per-node N`` (env ``RANK``/``WORLD_SIZE``) rank r takes items
``i % N == r``; ranks meet at a barrier at the end and rank 0 merges the logs.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime as dt
import functools
import glob
import json
import os
import re
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hirescam3d.pipeline import scan_memory, stages

from .console import items_progress, out_console, throughput
from .errors import (
    CLIUsageError,
    describe,
    exit_code_for,
    print_error,
    show_kept,
    warnings_to_stderr,
)
from .explain import ExplainOptions, check_options, run_pipeline
from .models import load_checked

DONE_MARKER = "batch_done.json"
LOG_NAME = "batch_log.jsonl"
RANK_LOG_DIR = ".batch_logs"
_GLOB_CHARS = re.compile(r"[*?\[]")
_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")


class Source(NamedTuple):
    """One input as listed: the scan, the output folder name it asks for (manifest ``id``)
    and its region mask for a segmentation model (manifest ``region``)."""

    path: Path
    id: str | None = None
    region: Path | None = None


@dataclass(frozen=True)
class BatchItem:
    """One scan of a batch: its position in the full list, its path, output folder name
    and region mask (None: the batch's ``--region``)."""

    index: int
    path: Path
    id: str
    region: Path | None = None


# -- inputs -------------------------------------------------------------------------------
def _is_dicom_file(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    if path.suffix:
        return False
    from hirescam3d.io.scans import looks_like_dicom

    return looks_like_dicom(path)


def _is_image_file(path: Path) -> bool:
    from hirescam3d.io.scans import SCAN_SUFFIXES

    name = path.name.lower()
    return any(name.endswith(s) for s in SCAN_SUFFIXES if s != ".dcm")


def scans_in_folder(folder: Path, depth: int = 3) -> list[tuple[Path, str | None]]:
    """Scans under ``folder``, sorted: the folder itself if it holds one DICOM series (DICOM
    files and no other images), else its image files and the scans of its subfolders
    (down to ``depth`` levels). Hidden files and folders are ignored."""
    try:
        entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    except OSError as err:
        raise CLIUsageError(f"cannot list folder {folder}: {err.strerror or err}") from err
    files = [p for p in entries if p.is_file()]
    images = [p for p in files if _is_image_file(p)]
    if not images and any(_is_dicom_file(p) for p in files):
        return [(folder, None)]
    found: list[tuple[Path, str | None]] = [(p, None) for p in images]
    if depth > 0:
        for sub in entries:
            if sub.is_dir():
                found.extend(scans_in_folder(sub, depth - 1))
    return found


def read_manifest(path: Path) -> list[Source]:
    """Rows of a CSV manifest: a ``path`` column, an optional ``id`` column naming the
    output subfolder and an optional ``region`` column (a mask on that scan's grid, for
    segmentation models); paths are relative to the CSV's folder."""

    def resolve(value: str) -> Path:
        item = Path(value).expanduser()
        return item if item.is_absolute() else path.parent / item

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            fields = {(name or "").strip().lower(): name for name in reader.fieldnames or []}
            if "path" not in fields:
                raise CLIUsageError(
                    f"manifest {path}: no 'path' column (columns: "
                    f"{', '.join(reader.fieldnames or []) or 'none'}); the first row must name "
                    "the columns, e.g. 'path,id'"
                )
            rows = []
            for line, row in enumerate(reader, start=2):
                value = (row.get(fields["path"]) or "").strip()
                if not value:
                    raise CLIUsageError(f"manifest {path}, line {line}: empty 'path'")
                ident = (row.get(fields["id"]) or "").strip() if "id" in fields else ""
                mask = (row.get(fields["region"]) or "").strip() if "region" in fields else ""
                rows.append(Source(resolve(value), ident or None, resolve(mask) if mask else None))
    except UnicodeDecodeError as err:
        raise CLIUsageError(f"manifest {path}: not a UTF-8 text CSV file ({err})") from err
    except csv.Error as err:
        raise CLIUsageError(f"manifest {path}: malformed CSV ({err})") from err
    if not rows:
        raise CLIUsageError(f"manifest {path}: has a header but no rows")
    check_duplicate_rows(path, rows)
    return rows


def check_duplicate_rows(manifest: Path, rows: Sequence[Source]) -> None:
    """CLIUsageError listing the scans a manifest names on more than one row (each would be
    explained twice, or one row silently dropped)."""
    lines: dict[str, list[int]] = {}
    for line, row in enumerate(rows, start=2):
        lines.setdefault(os.path.realpath(row.path), []).append(line)
    repeated = {p: ls for p, ls in lines.items() if len(ls) > 1}
    if repeated:
        shown = "; ".join(
            f"{Path(p).name} on lines {', '.join(map(str, ls))}"
            for p, ls in list(repeated.items())[:3]
        )
        more = f" and {len(repeated) - 3} more" if len(repeated) > 3 else ""
        raise CLIUsageError(
            f"manifest {manifest}: {len(repeated)} scan{'s are' if len(repeated) > 1 else ' is'}"
            f" listed more than once ({shown}{more}); keep one row per scan"
        )


def collect_inputs(inputs: Sequence[str]) -> list[Source]:
    """Expand globs, folders and CSV manifests into :class:`Source` rows, in order.

    The same file named twice is kept once. Raises CLIUsageError for a missing path, a
    glob without matches or a folder without scans.
    """
    found: list[Source] = []
    for text in inputs:
        path = Path(text).expanduser()
        if path.exists():
            if path.is_dir():
                scans = scans_in_folder(path)
                if not scans:
                    raise CLIUsageError(
                        f"folder {path}: holds no scans (.nii, .nii.gz, .nrrd, .mha, .mhd or "
                        "DICOM series folders)"
                    )
                found.extend(Source(p, i) for p, i in scans)
            elif path.suffix.lower() == ".csv":
                found.extend(read_manifest(path))
            else:
                found.append(Source(path))
        elif _GLOB_CHARS.search(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            if not matches:
                raise CLIUsageError(f"no files match {text!r}")
            found.extend(Source(Path(m)) for m in matches)
        else:
            raise CLIUsageError(f"input {path}: no such file or folder; check the path")
    unique: dict[str, Source] = {}
    for source in found:
        first = unique.setdefault(os.path.abspath(source.path), source)
        if first is not source and (first.id, first.region) != (source.id, source.region):
            raise CLIUsageError(
                f"input {source.path} is given twice with different ids or regions "
                f"({first.id or '-'} / {source.id or '-'}); list each scan once"
            )
    return list(unique.values())


def assign_ids(inputs: Sequence[Source | tuple[Path, str | None]]) -> list[BatchItem]:
    """Items with unique output folder names: the manifest id or the scan stem, with
    ``_2``, ``_3``... appended to repeats (deterministic, so every rank agrees)."""
    from hirescam3d.io.scans import scan_stem

    items: list[BatchItem] = []
    used: set[str] = set()
    for index, row in enumerate(inputs):
        path, ident, region = Source(*row)
        base = _SAFE_ID.sub("_", ident or scan_stem(path)).strip("._") or f"item{index}"
        name, n = base, 1
        while name in used or name in (RANK_LOG_DIR,):
            n += 1
            name = f"{base}_{n}"
        used.add(name)
        items.append(BatchItem(index, path, name, region))
    return items


def check_item_regions(items: Sequence[BatchItem], opts: ExplainOptions) -> None:
    """CLIUsageError when the manifest gives region masks to a classifier, or names a mask
    that does not exist."""
    given = [item for item in items if item.region is not None]
    if given and opts.handle.kind != "segmentation":
        raise CLIUsageError(
            f"the manifest gives region masks (first: {given[0].region}), but {opts.model} is "
            "a classifier (one score per finding): drop the 'region' column"
        )
    for item in given:
        if not item.region.exists():
            raise CLIUsageError(
                f"region mask {item.region} (manifest row of {item.path.name}): no such file; "
                "check the 'region' column"
            )


def shard(items: Sequence[BatchItem], rank: int, world_size: int) -> list[BatchItem]:
    """The items of ``rank``: those whose index ``i`` has ``i % world_size == rank``."""
    return [item for item in items if item.index % world_size == rank]


# -- files --------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` to a temporary file beside ``path``, flush it to disk, then rename it
    into place (:func:`hirescam3d.io.outputs.atomic_write_text`)."""
    from hirescam3d.io.outputs import atomic_write_text as write

    return write(path, text, force=True, durable=True)


def read_marker(folder: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((folder / DONE_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def done_state(folder: Path, signature: dict[str, Any]) -> str:
    """``"done"``, ``"other-options"`` (done, but with different options) or ``"todo"``."""
    marker = read_marker(folder)
    if marker is None or marker.get("status") != "ok":
        return "todo"
    outputs = marker.get("outputs")
    if not isinstance(outputs, list) or not all((folder / name).is_file() for name in outputs):
        return "todo"
    return "done" if marker.get("options") == signature else "other-options"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _read_jsonl(path: Path) -> list[str]:
    try:
        return [line for line in path.read_text().splitlines() if line.strip()]
    except OSError:
        return []


def _record_key(record: dict[str, Any]) -> tuple[str, str, str]:
    return (str(record.get("run")), str(record.get("rank", 0)), str(record.get("index")))


def fold_rank_logs(out: Path) -> list[dict[str, Any]]:
    """Append the per-rank logs to ``batch_log.jsonl`` (atomically) and delete them.

    Returns the records that were appended, ordered by item index. Lines already in the
    log (a fold interrupted after writing) are not repeated.
    """
    logs = out / RANK_LOG_DIR
    parts = sorted(logs.glob("rank-*.jsonl")) if logs.is_dir() else []
    if not parts:
        return []
    log = out / LOG_NAME
    existing = _read_jsonl(log)
    # A fold interrupted after writing the log but before deleting the rank files must
    # not log their records twice: records are identified by (run, rank, index).
    have = set()
    for line in existing:
        try:
            have.add(_record_key(json.loads(line)))
        except (ValueError, AttributeError):
            continue
    records = []
    for part in parts:
        for line in _read_jsonl(part):
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and _record_key(record) not in have:
                have.add(_record_key(record))
                records.append(record)
    records.sort(key=lambda r: (str(r.get("run", "")), str(r.get("index", "")).zfill(12)))
    new_lines = [json.dumps(r, sort_keys=True) for r in records]
    atomic_write_text(log, "".join(f"{line}\n" for line in existing + new_lines))
    for part in parts:
        part.unlink(missing_ok=True)
    try:
        logs.rmdir()
    except OSError:
        pass
    return records


class RankLog:
    """This rank's records of the current run, rewritten atomically after every item."""

    def __init__(self, out: Path, rank: int) -> None:
        self.path = out / RANK_LOG_DIR / f"rank-{rank}.jsonl"
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in self.records)
        atomic_write_text(self.path, text)


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()  # only succeeds when empty: a failed item leaves no clutter
    except OSError:
        pass


# -- torchrun -----------------------------------------------------------------------------
def env_rank() -> tuple[int, int]:
    """``(rank, world_size)`` from torchrun's environment; ``(0, 1)`` outside torchrun."""
    env = os.environ
    world_size = int(env.get("WORLD_SIZE", "1")) if "RANK" in env else 1
    return (int(env.get("RANK", "0")) if world_size > 1 else 0), world_size


class Distributed:
    """Rank, world size and collectives; a no-op stand-in when not under torchrun."""

    def __init__(self, device: str = "auto") -> None:
        self.rank, self.world_size = env_rank()
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.backend: str | None = None
        self.device = device
        if self.world_size <= 1:
            return
        import torch
        import torch.distributed as dist

        use_cuda = device in ("auto", "cuda") and torch.cuda.is_available()
        self.backend = "nccl" if use_cuda else "gloo"
        if use_cuda:
            count = torch.cuda.device_count()
            if self.local_rank >= count:
                from hirescam3d.errors import HiResCAMError

                raise HiResCAMError(
                    f"rank {self.rank}: LOCAL_RANK {self.local_rank} but this machine has "
                    f"{count} CUDA device(s); use --nproc-per-node {count} or --device cpu"
                )
            torch.cuda.set_device(self.local_rank)
        # Ranks wait for each other only at the end; allow long, unbalanced shares.
        dist.init_process_group(self.backend, timeout=dt.timedelta(hours=24))

    @property
    def active(self) -> bool:
        return self.backend is not None

    def _device(self):
        import torch

        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else None

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            if self.backend == "nccl":
                dist.barrier(device_ids=[self.local_rank])
            else:
                dist.barrier()

    def total(self, value: int) -> int:
        """Sum of ``value`` over all ranks."""
        if not self.active:
            return value
        import torch
        import torch.distributed as dist

        tensor = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.all_reduce(tensor)
        return int(tensor.item())

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self._device())
        return box[0]

    def close(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.backend = None


# -- the batch ----------------------------------------------------------------------------
Explain = Callable[..., tuple[Any, dict[str, Path]]]


def scan_reads(item: BatchItem, opts: ExplainOptions) -> dict[Any, tuple[Any, tuple[Any, ...]]]:
    """The reads :func:`hirescam3d.pipeline.explain_scan` will make for ``item`` (its scan
    and the organ map), for :class:`hirescam3d.pipeline.stages.ReadAhead`."""
    from hirescam3d.io import scans as io
    from hirescam3d.io.organs import load_organ_map

    reads: dict[Any, tuple[Any, tuple[Any, ...]]] = {
        stages.scan_key(item.path, opts.series): (io.read_stored, (item.path, opts.series))
    }
    if opts.organs is not None:
        reads[stages.organs_key(opts.organs, opts.organ_names)] = (
            load_organ_map, (opts.organs, opts.organ_names))  # fmt: skip
    return reads


def reads_ahead(
    item: BatchItem, out: Path, opts: ExplainOptions, signature: dict[str, Any]
) -> dict[Any, tuple[Any, tuple[Any, ...]]]:
    """:func:`scan_reads`, or none for an item that :func:`start_item` will skip."""
    if not opts.force:
        if item.region is not None:
            signature = {**signature, "region": os.path.abspath(item.region)}
        if done_state(out / item.id, signature) != "todo":
            return {}
    return scan_reads(item, opts)


def read_first_early(
    ahead: stages.ReadAhead, items: Sequence[BatchItem], out: Path, opts: ExplainOptions
) -> None:
    """Start reading this rank's first scan while the model loads, and making the float32
    arrays of its size (a core is idle then), unless its folder has a done marker (a
    resumed run may skip it; the marker's options are checked later)."""
    rank, world_size = env_rank()
    mine = shard(items, rank, world_size)
    if mine and (opts.force or not (out / mine[0].id / DONE_MARKER).exists()):
        reads = scan_reads(mine[0], opts)
        memory = scan_memory.active()
        if memory is not None:
            key = stages.scan_key(mine[0].path, opts.series)
            reads[key] = (_read_and_prepare, (mine[0].path, opts.series, memory))
        ahead.start(reads)


def _read_and_prepare(path: Path, series: str | None, memory: scan_memory.ScanMemory) -> Any:
    """``io.read_stored``, then the arrays of the scan's size (read-ahead thread)."""
    from hirescam3d.io import scans as io

    stored = io.read_stored(path, series)
    memory.prepare(stored.array.shape)
    return stored


def start_item(
    item: BatchItem,
    out: Path,
    opts: ExplainOptions,
    loaded: tuple[Any, Any],
    signature: dict[str, Any],
    explain: Explain,
    debug: bool = False,
    defer: bool = False,
) -> Callable[[], dict[str, Any]]:
    """Begin one item unless it is done; return the function that ends it and returns its
    log record (neither raises Exception). With ``defer`` (``explain`` is
    :func:`run_pipeline`, on the batch's writer) its maps may still be being written: the
    function, run as the writer's next job, waits for them, moves the outputs into place
    and writes the done marker."""
    folder = out / item.id
    record: dict[str, Any] = {
        "index": item.index,
        "input": os.path.abspath(item.path),
        "id": item.id,
        "out_dir": os.path.abspath(folder),
        "started": _now(),
    }
    start = time.perf_counter()
    if item.region is not None:  # the manifest's mask for this scan
        opts = dataclasses.replace(opts, region=str(item.region))
        signature = {**signature, "region": os.path.abspath(item.region)}
    state = "todo" if opts.force else done_state(folder, signature)
    if state != "todo":
        note = (
            "already done"
            if state == "done"
            else ("done earlier with other options; pass --force to redo it")
        )
        record.update(status="skipped", error=None, note=note, seconds=0.0, finished=_now())
        record["outputs"] = (read_marker(folder) or {}).get("outputs", [])
        return lambda: record
    ending = _ItemEnd(record, folder, signature, start, debug)
    try:
        item_opts = dataclasses.replace(opts, force=True)
        # No marker: whatever is in the folder is a leftover of an interrupted run.
        (folder / DONE_MARKER).unlink(missing_ok=True)
        with warnings_to_stderr(debug) as ending.shown:
            if defer:
                pending = explain(item.path, folder, item_opts, loaded, defer=True)
                return functools.partial(ending, pending.finish, pending.warnings)
            done = explain(item.path, folder, item_opts, loaded)
    except Exception as err:  # noqa: BLE001 - one failing item must not stop the batch
        return functools.partial(ending.failed, err)
    return functools.partial(ending, lambda: done)


@dataclass
class _ItemEnd:
    """The end of an item begun by :func:`start_item`: its done marker and log record."""

    record: dict[str, Any]
    folder: Path
    signature: dict[str, Any]
    start: float
    debug: bool
    shown: set[str] = dataclasses.field(default_factory=set)

    def __call__(
        self, finish: Callable[[], tuple[Any, dict[str, Path]]], kept: list[Any] | None = None
    ) -> dict[str, Any]:
        """``finish()`` -> ``(result, paths)``, then the done marker; the record. ``kept``:
        the item's warnings kept on the batch's writer, shown here."""
        try:
            with stages.keep_warnings(kept):
                result, paths = finish()
            seconds = round(time.perf_counter() - self.start, 3)
            outputs = sorted(os.path.relpath(p, self.folder) for p in paths.values())
            marker = {"status": "ok", "input": self.record["input"], "outputs": outputs,
                      "options": self.signature, "finished": _now(),
                      "seconds": seconds}  # fmt: skip
            atomic_write_text(self.folder / DONE_MARKER, json.dumps(marker, indent=2) + "\n")
        except Exception as err:  # noqa: BLE001 - one failing item must not stop the batch
            return self.failed(err)
        finally:
            show_kept(kept or [], self.debug, self.shown)
        self.record.update(
            status="ok",
            error=None,
            outputs=outputs,
            explained=list(getattr(result, "findings", [])),
            probabilities=dict(getattr(result, "probabilities", {})),
            warnings=sorted(set(getattr(result, "warnings", [])) | self.shown),
            seconds=seconds,
            timings_s=(getattr(result, "report", None) or {}).get("timings_s"),
            finished=_now(),
        )
        return self.record

    def failed(self, err: Exception) -> dict[str, Any]:
        """The record of an item that failed with ``err``; its folder removed if empty."""
        if self.debug:
            traceback.print_exception(err)
        self.record.update(
            status="failed",
            error=describe(err),
            error_type=type(err).__name__,
            exit_code=exit_code_for(err),
            seconds=round(time.perf_counter() - self.start, 3),
            finished=_now(),
        )
        _remove_if_empty(self.folder)
        return self.record


def print_batch_summary(records: list[dict[str, Any]], out: Path) -> None:
    """Failed items as a table, then one line of counts (stdout)."""
    from rich.table import Table

    counts = {s: sum(r.get("status") == s for r in records) for s in ("ok", "skipped", "failed")}
    console = out_console()
    failed = [r for r in records if r.get("status") == "failed"]
    if failed:
        table = Table(title="Failed items", title_justify="left")
        table.add_column("input", overflow="fold")
        table.add_column("error", overflow="fold")
        for r in failed:
            table.add_row(str(r.get("input")), str(r.get("error")))
        console.print(table)
    other = sum(r.get("status") == "skipped" and r.get("note") != "already done" for r in records)
    skipped = f"{counts['skipped']} skipped (done earlier"
    skipped += f"; {other} with other options: --force redoes them)" if other else ")"
    console.print(
        f"{len(records)} items: {counts['ok']} explained, {skipped}, {counts['failed']} "
        f"failed; outputs in {out}, log {out / LOG_NAME}"
    )


@dataclass(frozen=True)
class _CheckedBatch:
    """A batch ready to run: its items, checked options, loaded model and explain function."""

    items: list[BatchItem]
    opts: ExplainOptions
    loaded: tuple[Any, Any]
    signature: dict[str, Any]  # what a done marker must record for an item to be skipped
    explain: Explain


def _check_batch(
    inputs: Sequence[str],
    out: Path,
    opts: ExplainOptions,
    explain: Explain | None,
    ahead: stages.ReadAhead,
) -> _CheckedBatch:
    """Check the inputs and options and load the model (the first scan is read meanwhile);
    usage errors raise here."""
    from .explain import check_out_folder

    check_out_folder(out)
    items = assign_ids(collect_inputs(inputs))
    opts = check_options(opts)
    check_item_regions(items, opts)
    nnunet = opts.handle.source == "nnunet"  # nnU-Net's own path, as `explain` takes it
    if nnunet:
        from .nnunet import check_nnunet_options, explain_nnunet_item, nnunet_signature

        check_nnunet_options(opts)
        if any(item.region is not None for item in items):
            raise CLIUsageError("nnU-Net model folders are explained on nnU-Net's predicted "
                                "regions: drop the manifest's 'region' column")  # fmt: skip
    explain = explain or (explain_nnunet_item if nnunet else run_pipeline)
    if explain is run_pipeline:
        read_first_early(ahead, items, out, opts)
    loaded = load_checked(opts.handle, opts.layer)
    # New weights under the same model name make earlier outputs stale.
    signature = {**opts.signature(), "weights_sha256": getattr(loaded[1], "weights_sha256", None)}
    if nnunet:
        signature |= nnunet_signature(opts.handle)
    return _CheckedBatch(items, opts, loaded, signature, explain)


def _writable_folder(out: Path) -> Path:
    """Create ``out``; raise :class:`HiResCAMError` if it is not writable."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not os.access(out, os.W_OK):
        from hirescam3d.errors import HiResCAMError

        raise HiResCAMError(
            f"output folder {out} is not writable; choose another --out folder or fix its "
            "permissions"
        )
    return out


def _explain_share(
    batch: _CheckedBatch,
    out: Path,
    dist: Distributed,
    run_id: str,
    show: bool,
    debug: bool,
    ahead: stages.ReadAhead,
) -> RankLog:
    """Explain this rank's share of the items, logging each record; return the rank's log.

    With :func:`run_pipeline`, item k ends (its last map written, its outputs moved into
    place, its marker and log record written) on the batch's writer while item k+1 is
    read and explained; records are still logged in order, one item at a time."""
    opts, explain, signature = batch.opts, batch.explain, batch.signature
    mine = shard(batch.items, dist.rank, dist.world_size)
    log = RankLog(out, dist.rank)
    prefix = f"[rank {dist.rank}] " if dist.world_size > 1 else ""
    overlap = explain is run_pipeline
    with items_progress(show) as progress, _writer(overlap) as writer:
        label = "explaining" + (f" (rank 0 of {dist.world_size})" if prefix else "")
        task = progress.add_task(label, total=len(mine), rate="")
        rate = _Rate()

        def end(index: int, item: BatchItem, ending: Callable[[], dict[str, Any]],
                begun: float) -> None:  # fmt: skip
            record = ending()
            record.update(run=run_id, rank=dist.rank, world_size=dist.world_size)
            log.add(record)
            if record["status"] == "failed":
                where = "" if str(item.path) in record["error"] else f"{item.path}: "
                print_error(f"{prefix}{where}{record['error']}")
            rate.add(record["status"] != "skipped", begun)
            progress.update(task, advance=1, rate=rate.text(len(mine) - index - 1))

        for index, item in enumerate(mine):
            begun = time.perf_counter()
            progress.update(task, description=f"{label}: {item.path.name}")
            if index + 1 < len(mine) and overlap:  # read k+1 during k
                ahead.start_after_read(reads_ahead(mine[index + 1], out, opts, signature))
            ending = start_item(item, out, opts, batch.loaded, signature, explain, debug,
                                defer=writer is not None)  # fmt: skip
            ahead.release()  # if scan k was skipped or failed before it was in memory
            if writer is None:
                end(index, item, ending, begun)
            else:
                writer.then(end, index, item, ending, begun)
    return log


def _writer(overlap: bool) -> contextlib.AbstractContextManager[stages.BackgroundWriter | None]:
    """The batch's writer (:func:`stages.batch_writer`) when items overlap, else None."""
    return stages.batch_writer() if overlap else contextlib.nullcontext()


class _Rate:
    """Scans per minute and the time left, from the items explained (not skipped): their
    time is counted once where items overlap."""

    def __init__(self) -> None:
        self.worked, self.seconds, self.until = 0, 0.0, 0.0

    def add(self, worked: bool, begun: float) -> None:
        now = time.perf_counter()
        if worked:
            self.worked += 1
            self.seconds += now - max(begun, self.until)
        self.until = now

    def text(self, left: int) -> str:
        return throughput(self.worked, self.seconds, left)


def _report_run(out: Path, run_id: str, log: RankLog, json_out: bool, quiet: bool) -> None:
    """Rank 0: merge every rank's log into the batch log and show this run's records."""
    records = fold_rank_logs(out)
    records = [r for r in records if r.get("run") == run_id] or log.records
    if json_out:
        sys.stdout.write(json.dumps(records, indent=2, default=str) + "\n")
    elif not quiet:
        print_batch_summary(records, out)


def batch_command(
    inputs: Sequence[str],
    out: Path,
    opts: ExplainOptions,
    json_out: bool = False,
    quiet: bool = False,
    debug: bool = False,
    explain: Explain | None = None,
) -> int:
    """Run ``hirescam3d batch``; return the exit code (1 if any item failed on any rank).

    Usage errors (missing inputs, unknown model or finding) raise before any rank starts
    work; ``explain`` replaces :func:`run_pipeline` (tests).
    """
    with stages.read_ahead() as ahead, scan_memory.reuse():
        batch = _check_batch(inputs, out, opts, explain, ahead)
        out = _writable_folder(out)
        dist = Distributed(batch.opts.device)
        lock = OutputFolderLock(out, dist, batch.opts.wait)  # one writer per --out (rank 0)
        try:
            lock.acquire()
            if dist.rank == 0:
                fold_rank_logs(out)  # records of an earlier, interrupted run
            run_id = dist.broadcast(f"{_now()}-{uuid.uuid4().hex[:8]}")
            dist.barrier()
            show = not quiet and dist.rank == 0
            log = _explain_share(batch, out, dist, run_id, show, debug, ahead)
            failed_here = sum(r["status"] == "failed" for r in log.records)
            dist.barrier()
            failed = dist.total(failed_here)
            if dist.rank == 0:
                _report_run(out, run_id, log, json_out, quiet)
            dist.barrier()
        finally:
            lock.release()
            dist.close()
    return 1 if failed else 0


class OutputFolderLock:
    """The lock of ``--out`` (:mod:`hirescam3d.io.out_lock`) for a batch: rank 0 takes it and
    tells the other ranks whether it got it; while it holds it, it removes the temporary
    folders of killed runs (:func:`hirescam3d.io.staging.remove_stale_staging`)."""

    def __init__(self, out: Path, dist: Distributed, wait: bool) -> None:
        self.out, self.dist, self.wait = out, dist, wait
        self._held: contextlib.ExitStack | None = None

    def acquire(self) -> None:
        from hirescam3d.errors import HiResCAMError
        from hirescam3d.io.out_lock import output_lock
        from hirescam3d.io.staging import remove_stale_staging

        refused = None
        if self.dist.rank == 0:
            stack = contextlib.ExitStack()
            try:
                stack.enter_context(output_lock(self.out, "hirescam3d batch", wait=self.wait))
                self._held = stack
                remove_stale_staging(self.out, depth=1)
            except HiResCAMError as err:
                refused = str(err)
        refused = self.dist.broadcast(refused)
        if refused:
            raise HiResCAMError(refused)

    def release(self) -> None:
        if self._held is not None:
            self._held.close()
            self._held = None
