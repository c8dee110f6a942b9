"""``hirescam3d sample DIR``: write the demo scan and its organ map."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from .console import note


def sample_command(directory: Path, force: bool = False, quiet: bool = False) -> None:
    """Write the sample files, print their paths (stdout) and the next command (stderr)."""
    from hirescam3d.data.sample import write_sample

    note(f"writing the sample chest CT into {directory} ...", quiet)
    paths = write_sample(directory, force=force)
    width = max(len(key) for key in paths)
    for key, path in paths.items():
        sys.stdout.write(f"{path}\n" if quiet else f"{key:<{width}}  {path}\n")
    note(
        "try: hirescam3d explain "
        f"{shlex.quote(str(paths['scan']))} --finding atelectasis "
        f"--organs {shlex.quote(str(paths['organs']))} "
        f"--organ-names {shlex.quote(str(paths['organ_names']))}",
        quiet,
    )
