"""Reading 2D images: photographs (PNG, JPEG, TIFF), a single-slice DICOM, a 2D NIfTI.

Every reader returns an :class:`Image2D`: a float32 ``(C, H, W)`` array in display order
(rows top to bottom, columns left to right, as Pillow and pydicom give it; C = 3 for
colour, 1 for grayscale) and the 4x4 affine of the NIfTI index ``(column, row, 0)`` ->
RAS mm, i.e. of ``array[c].T``. A map written as ``plane.T`` with that affine lies on the
image in any viewer.

- PNG, JPEG: Pillow, EXIF orientation applied (what photo viewers show); palette,
  alpha and CMYK images converted to RGB, 1-bit to 8-bit grayscale, 16-bit and float
  grayscale kept as values.
- TIFF: tifffile; one grayscale or RGB(A) page (a stack of pages is refused).
- Photographs have no world geometry: 1 mm pixels, columns toward patient left and rows
  toward posterior, as a DICOM image with the identity orientation.
- DICOM: one image (not multi-frame) with pydicom: values are RescaleSlope * stored +
  RescaleIntercept (HU for CT), placed by ImagePositionPatient, ImageOrientationPatient
  and PixelSpacing.
- NIfTI: nibabel through the checked reader of :mod:`hirescam3d.io.nifti`; exactly two
  axes longer than 1 among the first three. ``(I, J)`` becomes rows J, columns I.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from hirescam3d.errors import ScanError

PHOTO_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NIFTI_SUFFIXES = (".nii.gz", ".nii")
SUPPORTED_2D = "PNG, JPEG, TIFF, a single-slice DICOM file or a 2D NIfTI"
# DICOM's LPS world to NIfTI's RAS: flip x and y.
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


@dataclass
class Image2D:
    """A 2D image. ``array``: float32 ``(C, H, W)``; ``affine``: 4x4 NIfTI index
    ``(column, row, 0)`` -> RAS mm; ``source``: ``"photo"``, ``"dicom"`` or ``"nifti"``;
    ``mode``: ``"RGB"`` or ``"L"`` (grayscale); ``warnings``: texts of what reading
    chose."""

    array: np.ndarray
    affine: np.ndarray
    path: Path
    source: str
    mode: str
    sha256: str = ""
    warnings: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, int]:
        """``(H, W)``: rows, columns."""
        return int(self.array.shape[1]), int(self.array.shape[2])

    @property
    def spacing(self) -> tuple[float, float]:
        """Pixel size in mm ``(between rows, between columns)``."""
        cols, rows = np.linalg.norm(self.affine[:3, :2], axis=0)
        return float(rows), float(cols)


def _suffix(path: Path) -> str:
    name = path.name.lower()
    for s in NIFTI_SUFFIXES + PHOTO_SUFFIXES + (".dcm",):
        if name.endswith(s):
            return s
    return path.suffix.lower()


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def photo_affine(spacing: tuple[float, float] = (1.0, 1.0)) -> np.ndarray:
    """The affine of a picture without geometry: columns toward patient left, rows toward
    posterior (``spacing``: mm between rows, between columns), origin at the first pixel."""
    return _LPS_TO_RAS @ np.diag([spacing[1], spacing[0], 1.0, 1.0])


def _channels(arr: np.ndarray, path: Path, what: str) -> tuple[np.ndarray, str]:
    """``(H, W)`` or ``(H, W, S)`` pixels -> float32 ``(C, H, W)`` and the mode."""
    if arr.ndim == 2:
        return arr.astype(np.float32)[None], "L"
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):
        return np.moveaxis(arr[..., :3].astype(np.float32), -1, 0), "RGB"
    if arr.ndim == 3 and arr.shape[-1] in (1, 2):  # gray (+ alpha)
        return arr[..., 0].astype(np.float32)[None], "L"
    raise ScanError(
        f"{path}: the {what} holds pixels of shape {arr.shape}, not one grayscale or RGB "
        "image; save a single 2D image (one page, 1 or 3 channels)"
    )


def _read_pillow(path: Path) -> tuple[np.ndarray, str]:
    from PIL import Image, ImageOps, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if getattr(im, "n_frames", 1) > 1:
                raise ScanError(
                    f"{path}: an animation of {im.n_frames} frames; save the one frame to "
                    "explain as a single image"
                )
            im = ImageOps.exif_transpose(im)
            if im.mode in ("1", "LA", "La"):  # bilevel, gray + alpha: 8-bit gray
                im = im.convert("L")
            elif im.mode not in ("L", "RGB", "I", "F") and not im.mode.startswith("I;"):
                im = im.convert("RGB")  # palette, alpha, CMYK, YCbCr: RGB
            arr = np.asarray(im)
    except ScanError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ScanError(
            f"{path}: Pillow cannot read this file ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); check that it is a complete "
            f"{_suffix(path)[1:].upper()} image and save it again"
        ) from err
    return _channels(arr, path, "image")


def _read_tiff(path: Path) -> tuple[np.ndarray, str]:
    import tifffile

    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            arr = series.asarray()
            axes = series.axes
    except (tifffile.TiffFileError, OSError, ValueError, IndexError) as err:
        raise ScanError(
            f"{path}: tifffile cannot read this file ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); check that it is a complete TIFF image"
        ) from err
    keep = [i for i, a in enumerate(axes) if a in "YXS" or arr.shape[i] > 1]
    arr = arr.reshape([arr.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if axes not in ("YX", "YXS"):
        raise ScanError(
            f"{path}: the TIFF holds a stack of shape {arr.shape} (axes {axes}), not one "
            "2D image; save the one page to explain"
        )
    return _channels(arr, path, "TIFF")


def read_photo(path: str | Path) -> Image2D:
    """A PNG, JPEG or TIFF picture as an :class:`Image2D` (1 mm pixels, see module)."""
    path = Path(path)
    arr, mode = _read_tiff(path) if _suffix(path) in (".tif", ".tiff") else _read_pillow(path)
    return Image2D(arr, photo_affine(), path, "photo", mode, _sha256(path))


def dicom_frames(path: Path) -> int | None:
    """Number of frames of a DICOM image file (1 for a single image); None if the file is
    not DICOM or holds no image."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # not DICOM (pydicom raises several types)
        return None
    if "Rows" not in ds:
        return None
    return int(ds.get("NumberOfFrames", 1) or 1)


def read_dicom_slice(path: str | Path) -> Image2D:
    """One DICOM image (not multi-frame) in physical values on its patient geometry."""
    import pydicom
    from pydicom.pixels import apply_modality_lut

    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
        stored = ds.pixel_array
    except Exception as err:  # InvalidDicomError, missing decoder, truncated pixel data
        raise ScanError(
            f"{path}: pydicom cannot read the image ({type(err).__name__}: "
            f"{' '.join(str(err).split())[:200]}); check that it is a complete DICOM image"
        ) from err
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise ScanError(
            f"{path}: a multi-frame DICOM ({ds.NumberOfFrames} frames) is a volume, not a 2D "
            "image; explain it with a 3D model"
        )
    notes: list[str] = []
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        values = np.asarray(apply_modality_lut(stored, ds), dtype=np.float32)
    else:
        values = np.asarray(stored, dtype=np.float32)
    arr, mode = _channels(values, path, "DICOM image")
    spacing = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    iop, ipp = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient")
    if spacing is None or iop is None or ipp is None:
        spacing = [float(v) for v in spacing] if spacing is not None else [1.0, 1.0]
        affine = photo_affine((spacing[0], spacing[1]))
        notes.append(
            f"{path}: no patient geometry (ImageOrientationPatient, ImagePositionPatient or "
            "PixelSpacing missing); the map is placed on the pixel grid"
        )
    else:
        row_dir = np.array([float(v) for v in iop[:3]])  # along a row: increasing column
        col_dir = np.array([float(v) for v in iop[3:]])  # down a column: increasing row
        normal = np.cross(row_dir, col_dir)
        thickness = float(ds.get("SliceThickness") or 1.0) or 1.0
        lps = np.eye(4)
        lps[:3, 0] = row_dir * float(spacing[1])
        lps[:3, 1] = col_dir * float(spacing[0])
        lps[:3, 2] = normal * thickness
        lps[:3, 3] = [float(v) for v in ipp]
        affine = _LPS_TO_RAS @ lps
    return Image2D(arr, affine, path, "dicom", mode, _sha256(path), notes)


def read_nifti2d(path: str | Path) -> Image2D:
    """A 2D NIfTI (two axes longer than 1 among the first three; nothing beyond)."""
    from hirescam3d.io.nifti import _read_nifti

    path = Path(path)
    data, affine, _, notes = _read_nifti(path)
    shape = tuple(data.shape)
    spatial = list(shape[:3]) + [1] * (3 - min(len(shape), 3))
    kept = [a for a in range(3) if spatial[a] > 1]
    if len(kept) != 2 or any(n > 1 for n in shape[3:]):
        what = "a 3D volume" if len(kept) == 3 else f"an image of shape {shape}"
        raise ScanError(
            f"{path}: {what} (shape {shape}), not a 2D image; a 2D model takes one "
            "slice: extract it, or explain the volume with a 3D model"
        )
    dropped = next(a for a in range(3) if a not in kept)
    plane = np.asarray(data).reshape(spatial)
    plane = np.take(plane, 0, axis=dropped)  # (I, J): the two kept axes in order
    out = np.eye(4)
    out[:3, 0], out[:3, 1] = affine[:3, kept[0]], affine[:3, kept[1]]
    out[:3, 2], out[:3, 3] = affine[:3, dropped], affine[:3, 3]
    return Image2D(np.ascontiguousarray(plane.T, np.float32)[None], out, path, "nifti", "L",
                   _sha256(path), list(notes))  # fmt: skip


def read_image2d(path: str | Path) -> Image2D:
    """Read a 2D image by its type (see the module); :class:`ScanError` (one line naming
    the file, what is wrong and what to do) for a missing, unreadable or 3D file, or
    non-finite or constant pixels."""
    path = Path(path)
    if not path.exists():
        raise ScanError(f"{path}: no such file or folder; check the path")
    suffix = _suffix(path)
    if path.is_dir():
        raise ScanError(
            f"{path}: a folder (a DICOM series is a volume); a 2D model takes one image: "
            f"{SUPPORTED_2D}"
        )
    if suffix in PHOTO_SUFFIXES:
        image = read_photo(path)
    elif suffix in NIFTI_SUFFIXES:
        image = read_nifti2d(path)
    elif suffix == ".dcm" or dicom_frames(path) is not None:
        image = read_dicom_slice(path)
    else:
        raise ScanError(
            f"{path}: not a supported 2D image (suffix {suffix or 'none'!r}); expected "
            f"{SUPPORTED_2D}"
        )
    finite = np.isfinite(image.array)
    if not finite.all():
        raise ScanError(
            f"{path}: {int((~finite).sum())} pixels are NaN or infinite; fill them before "
            "explaining"
        )
    if float(image.array.min()) == float(image.array.max()):
        raise ScanError(
            f"{path}: the image is constant (every pixel is {float(image.array.min()):g}); "
            "it holds no content - check the export"
        )
    return image


def spatial_dims_of_file(path: str | Path) -> int | None:
    """2 or 3: how many spatial axes the image in ``path`` has, from its header only
    (None if that cannot be told without reading it: the readers then decide)."""
    path = Path(path)
    if path.is_dir():
        return 3
    suffix = _suffix(path)
    if suffix in PHOTO_SUFFIXES:
        return 2
    if suffix in NIFTI_SUFFIXES:
        import nibabel as nib

        from hirescam3d.io.nifti import quiet_nibabel

        try:
            with quiet_nibabel():
                shape = nib.load(str(path)).shape
        except Exception:  # the readers say what is wrong
            return None
        return 2 if sum(n > 1 for n in shape[:3]) == 2 and len(shape) <= 3 else 3
    if path.is_file():
        frames = dicom_frames(path)
        if frames is not None:
            return 2 if frames == 1 else 3
    return None


def as_scan_array(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """A picture for :func:`hirescam3d.io.scans.read_image`: ``(I, J, 1)`` grayscale or
    ``(I, J, 1, 1, 3)`` RGB (NIfTI's index order and vector axis) and its affine."""
    image = read_photo(path)
    planes = image.array.transpose(2, 1, 0)  # (I, J, C)
    if image.mode == "L":
        return planes[:, :, :1], image.affine
    return planes[:, :, None, None, :], image.affine
