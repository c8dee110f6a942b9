"""Error types raised by hirescam3d.

Every error a user can cause derives from :class:`HiResCAMError`, so callers
(the CLI, the napari widget) can catch one type and show its message.
"""

from __future__ import annotations


class HiResCAMError(Exception):
    """Base class for all errors hirescam3d raises on bad input."""


class LayerError(HiResCAMError):
    """The target layer is unknown, or its output cannot be explained."""


class TargetError(HiResCAMError):
    """A target class index or name is invalid."""


class InputError(HiResCAMError):
    """The input tensor or image is unusable (rank, values, geometry)."""


class ModelError(HiResCAMError):
    """A model, bundle or checkpoint cannot be loaded or used."""


class ScanError(InputError):
    """A scan file or folder cannot be read or is not a usable CT."""


class OptionError(ScanError):
    """An option names something the input does not hold (e.g. an unknown DICOM series
    UID, ``--series`` on a file that is not DICOM): a usage error, exit code 2 in the CLI."""


class ModelOutputError(ModelError):
    """The model returns a tuple, list or dict and nothing picks the logits from it (pass
    ``output_selector=``; ``--output INDEX|KEY`` in the CLI): exit code 2 in the CLI."""
