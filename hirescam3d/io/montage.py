"""PNG montage of the most-attended axial slices (matplotlib, Agg backend).

What ``hirescam3d explain --png`` writes beside each map; :mod:`hirescam3d.evaluate.figures`
keeps the names importable.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hirescam3d.errors import InputError
from hirescam3d.io.outputs import atomic_write
from hirescam3d.io.scans import reorient


def most_attended_slices(explanation: np.ndarray, n_slices: int) -> list[int]:
    """Indices along axis 0 of the ``n_slices`` slices with the most explanation mass,
    in ascending index order."""
    mass = np.clip(explanation, 0.0, None).reshape(explanation.shape[0], -1).sum(axis=1)
    n = max(1, min(n_slices, explanation.shape[0]))
    top = np.argsort(-mass, kind="stable")[:n]
    return sorted(int(i) for i in top)


def save_montage(
    ct: np.ndarray,
    explanation: np.ndarray,
    path: str | Path,
    affine: np.ndarray | None = None,
    n_slices: int = 9,
    title: str | None = None,
    window: tuple[float, float] = (-1350.0, 150.0),
    force: bool = False,
) -> Path:
    """Save the ``n_slices`` most-attended axial slices of ``ct`` with the heat overlay.

    ``ct`` (HU) and ``explanation`` are ``(I, J, K)`` on the same grid; the explanation is
    a [0, 1] display map (sequential colormap), or, when it has negative values, a signed
    contribution map in logits per voxel (diverging colormap centred on 0). With
    ``affine`` (voxel -> RAS mm) both are first reoriented to S, P, L axes; without it
    they must already be in that order (axis 0 toward superior, rows anterior to
    posterior, columns patient right to left). Slices are shown in radiological
    convention (patient right on the image's left, anterior at the top), CT in
    ``window`` (default lung window W1500/L-600), with a colour bar for the map.
    Slices run from superior (top left) to inferior. Written atomically.
    """
    ct = np.asarray(ct, dtype=np.float32)
    explanation = np.asarray(explanation, dtype=np.float32)
    if ct.ndim != 3 or ct.shape != explanation.shape:
        raise InputError(
            f"ct {ct.shape} and explanation {explanation.shape} must be 3D volumes of the "
            "same shape"
        )
    z_mm = None
    if affine is not None:
        ct, spl = reorient(ct, affine, "SPL")
        explanation, _ = reorient(explanation, affine, "SPL")
        z_mm = [float((spl @ np.array([i, 0, 0, 1.0]))[2]) for i in range(ct.shape[0])]
    slices = most_attended_slices(explanation, n_slices)[::-1]  # superior first
    signed = bool((explanation < 0).any())
    top = float(np.abs(explanation).max()) or 1.0
    limits = (-top, top) if signed else (0.0, 1.0)

    def draw(tmp: Path) -> None:
        # The object API needs no pyplot and leaves the process's backend (napari: Qt) alone.
        from matplotlib.figure import Figure

        n = len(slices)
        cols = min(n, 3 if n <= 9 else 4)
        rows = -(-n // cols)
        aspect = ct.shape[1] / ct.shape[2]
        fig = Figure(figsize=(3.0 * cols + 0.8, 3.0 * rows * aspect + 0.6), dpi=100)
        grid = fig.add_gridspec(rows, cols + 1, width_ratios=[1] * cols + [0.06])
        heat = None
        for i, s in enumerate(slices):
            ax = fig.add_subplot(grid[i // cols, i % cols])
            ax.imshow(ct[s], cmap="gray", vmin=window[0], vmax=window[1],
                      interpolation="nearest")
            overlay = np.ma.masked_where(np.abs(explanation[s]) < 0.05 * limits[1],
                                         explanation[s])
            heat = ax.imshow(overlay, cmap="RdBu_r" if signed else "inferno",
                             vmin=limits[0], vmax=limits[1], alpha=0.55,
                             interpolation="bilinear")
            label = f"S {z_mm[s]:.0f} mm" if z_mm is not None else f"slice {s}"
            ax.set_title(label, fontsize=9)
            ax.text(0.02, 0.5, "R", color="w", transform=ax.transAxes, fontsize=8,
                    va="center")
            ax.text(0.98, 0.5, "L", color="w", transform=ax.transAxes, fontsize=8,
                    va="center", ha="right")
            ax.set_xticks([])
            ax.set_yticks([])
        if heat is not None:
            cbar = fig.colorbar(heat, cax=fig.add_subplot(grid[:, cols]))
            cbar.set_label(
                "contribution (logit per voxel)" if signed
                else "explanation (0 = none, 1 = strongest)"
            )
        if title:
            fig.suptitle(title, fontsize=11)
        fig.savefig(tmp, format="png")

    return atomic_write(path, draw, force=force)
