"""The shipped ``demo_seg``, from nothing, in one command: its training stages in order.

    python -m hirescam3d.models.training.seg_recipe --out hirescam3d/bundles/demo_seg

Each stage is one :mod:`~hirescam3d.models.training.train_seg` run on the same 1,400
training phantoms. The first trains from scratch with ``train_seg``'s defaults (v8); each
later one fine-tunes the weights of the stage before (``--init``). Only the last writes
``--out`` and chooses the mask post-processing on the validation seeds; the earlier
bundles go to ``--work`` (default: ``<out>.stages``), where a rerun finds and keeps
them. Every stage is seeded. A stage that stops at its ``--max-minutes`` guard records
fewer ``steps_completed`` than ``steps`` (its weights do not reproduce), and a rerun
trains it again. About 70 min on the quiet 2-core machine: 25.5 min for the first
stage, 10-11.5 min for each fine-tune, 1.5 min for the post-processing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from hirescam3d.models.training import train_seg

COMMAND = "python -m hirescam3d.models.training.seg_recipe"
# Confusions the first stage leaves (atelectasis called on pleural fluid, nodules and
# pericardial fluid called where there are none) are trained away by the mean BCE over the
# other lung findings' voxels (--exclusive) and the hardest negatives of the channels named.
_FINE_TUNE = ["--steps", "500", "--lr", "5e-4", "--hard-neg", "0.2", "--hard-k", "300"]
_HEART_TOO = ["--exclusive", "0.4", "--hard-channels", "nodule", "pericardial_effusion"]
STAGES: tuple[tuple[str, list[str]], ...] = (
    ("v8", []),
    ("v10", [*_FINE_TUNE, "--exclusive", "0.2", "--hard-channels", "nodule"]),
    ("v11", [*_FINE_TUNE, "--exclusive", "0.4", "--hard-channels", "nodule"]),
    ("v12", [*_FINE_TUNE, *_HEART_TOO]),
    ("v13", [*_FINE_TUNE, *_HEART_TOO]),
)


def _done(folder: Path) -> bool:
    """Whether ``folder`` holds a bundle whose training ran every step."""
    meta = folder / "configs" / "metadata.json"
    if not meta.is_file():
        return False
    training = json.loads(meta.read_text())["hirescam3d"].get("training") or {}
    return training.get("steps_completed") == training.get("steps")


def run(out: Path, work: Path) -> list[str]:
    """Run the stages; returns each stage's ``train_seg`` command."""
    commands, previous = [], None
    for k, (name, extra) in enumerate(STAGES):
        last = k == len(STAGES) - 1
        folder = out if last else work / name
        args = [*extra, "--out", str(folder)]
        if previous is not None:
            args += ["--init", str(previous)]
        if not last:
            args += ["--val-count", "0"]
        if last or not _done(folder):
            if folder.exists() and not last:
                shutil.rmtree(folder)  # an unfinished stage starts again
            train_seg.main(args)
        commands.append(" ".join([train_seg.COMMAND, *args]))
        previous = folder
    return commands


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("hirescam3d/bundles/demo_seg"))
    parser.add_argument("--work", type=Path, default=None,
                        help="folder for the earlier stages' bundles (default: <out>.stages)")
    args = parser.parse_args(argv)
    work = args.work or args.out.with_name(args.out.name + ".stages")
    stages = run(args.out, work)
    meta_path = args.out / "configs" / "metadata.json"
    meta = json.loads(meta_path.read_text())
    meta["hirescam3d"]["training"]["recipe"] = {
        "command": " ".join([COMMAND, *(sys.argv[1:] if argv is None else argv)]),
        "stages": stages,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    write_readme(args.out)
    return 0


def write_readme(bundle: Path) -> None:
    """Write the bundle's README again from its metadata, with the recipe."""
    from hirescam3d.models.bundle import README, readme_text
    from hirescam3d.models.handle import ModelHandle

    (bundle / README).write_text(readme_text(ModelHandle.resolve(str(bundle)).load()[1]))


if __name__ == "__main__":
    raise SystemExit(main())
