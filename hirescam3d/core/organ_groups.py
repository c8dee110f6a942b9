"""Coarse organ groups of label names: :func:`organ_group` maps fine-grained names
(TotalSegmentator's lobes, vertebrae, ribs) to the coarse organs the report also sums over
(``left_lung``, ``right_lung``, ``heart``, ``airway``, ``spine``, ``ribs``). Names only:
reading label maps is :mod:`hirescam3d.io.organs`.
"""

from __future__ import annotations

import re

_GROUPS: tuple[tuple[str, str], ...] = (
    (r"lung_(upper|middle|lower)_lobe_right|lung_right|right_lung", "right_lung"),
    (r"lung_(upper|lower)_lobe_left|lung_left|left_lung", "left_lung"),
    (r"heart(_[a-z_]+)?", "heart"),
    (r"trachea|airway|bronchus(_[a-z_]+)?", "airway"),
    (r"vertebrae_[CTLS]\d+|vertebra(e)?|spine|sacrum", "spine"),
    (r"rib_(left|right)_\d+|ribs?", "ribs"),
)


def organ_group(name: str) -> str:
    """Coarse organ of a label name: ``lung_upper_lobe_left`` -> ``left_lung``,
    ``vertebrae_T5`` -> ``spine``, ``rib_left_3`` -> ``ribs``, ``trachea`` -> ``airway``,
    ``heart_atrium_left`` -> ``heart``; any other name is its own group."""
    for pattern, group in _GROUPS:
        if re.fullmatch(pattern, name, flags=re.IGNORECASE):
            return group
    return name


def group_fractions(fractions: dict[str, float]) -> dict[str, float]:
    """Sum per-label fractions by :func:`organ_group` (e.g. the lobes into ``left_lung``)."""
    out: dict[str, float] = {}
    for name, share in fractions.items():
        group = organ_group(name)
        out[group] = out.get(group, 0.0) + share
    return out
