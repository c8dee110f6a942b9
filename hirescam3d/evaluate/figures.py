"""PNG montage of the most-attended axial slices: :mod:`hirescam3d.io.montage` renders it
(writing maps is :mod:`hirescam3d.io`'s job); the names stay importable here."""

from hirescam3d.io.montage import most_attended_slices, save_montage

__all__ = ["most_attended_slices", "save_montage"]
