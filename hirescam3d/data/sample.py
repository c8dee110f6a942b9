"""The demo scan: one fixed synthetic chest CT with organ labels and finding masks.

Used by ``hirescam3d sample DIR``, ``make demo`` and the napari plugin's sample data.
The phantom is seeded, so every call writes the same volumes.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hirescam3d.io.scans import OutputError

SAMPLE_SEED = 20260105
SAMPLE_FINDINGS: tuple[str, ...] = ("atelectasis", "pleural_effusion")
SAMPLE_STEM = "sample_chest"

# Keys of write_sample's result -> the file name ChestPhantom.save gives them.
_FILES = {
    "scan": f"{SAMPLE_STEM}_ct.nii.gz",
    "organs": f"{SAMPLE_STEM}_organs.nii.gz",
    "organ_names": f"{SAMPLE_STEM}_organs.json",
    "findings_json": f"{SAMPLE_STEM}_findings.json",
    **{name: f"{SAMPLE_STEM}_{name}.nii.gz" for name in SAMPLE_FINDINGS},
}
_SAVE_KEYS = {
    "scan": "ct",
    "organs": "organs",
    "organ_names": "organs_json",
    "findings_json": "findings_json",
}


def sample_paths(directory: str | Path) -> dict[str, Path]:
    """Where :func:`write_sample` puts each file (nothing is written)."""
    root = Path(directory)
    return {key: root / name for key, name in _FILES.items()}


def write_sample(directory: str | Path, force: bool = False) -> dict[str, Path]:
    """Write the demo chest CT and its ground truth into ``directory`` (created if needed).

    Returns ``{"scan": CT (int16 HU, 96 x 128 x 128 voxels of 3 x 2.5 x 2.5 mm, axes
    S, P, L), "organs": uint8 label map, "organ_names": JSON {"1": "right_lung", ...},
    "findings_json": JSON list of present findings, "atelectasis": uint8 mask,
    "pleural_effusion": uint8 mask}``. Files appear only complete (written in a temporary
    folder, then renamed). Raises :class:`~hirescam3d.io.scans.OutputError` if any exists and
    ``force`` is False, or if the folder cannot be written.
    """
    from hirescam3d.data.phantom import make_chest_ct

    targets = sample_paths(directory)
    root = Path(directory)
    existing = [p for p in targets.values() if p.exists()]
    if existing and not force:
        shown = ", ".join(p.name for p in existing[:3])
        more = f" and {len(existing) - 3} more" if len(existing) > 3 else ""
        raise OutputError(
            f"sample files already exist in {root}: {shown}{more}; use --force "
            "(force=True) to overwrite them, or choose another folder"
        )
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".sample-", dir=root))
    except OSError as err:
        raise OutputError(
            f"cannot write the sample into {root}: {err.strerror or err}; choose another folder"
        ) from err
    try:
        phantom = make_chest_ct(SAMPLE_SEED, findings=SAMPLE_FINDINGS)
        written = phantom.save(tmp, SAMPLE_STEM)
        for key, target in targets.items():
            source = written[_SAVE_KEYS.get(key, key)]
            os.chmod(source, 0o644)
            os.replace(source, target)
    except OSError as err:
        raise OutputError(f"cannot write the sample into {root}: {err.strerror or err}") from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return targets
