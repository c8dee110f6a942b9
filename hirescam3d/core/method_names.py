"""The names of the explanation methods that ship with hirescam3d, without importing torch.

The command line lists and validates ``--method`` from this tuple, so that ``--help``
and listings answer without loading torch; :mod:`hirescam3d.core.methods` registers exactly
these names (a test keeps the two equal). Methods a user registers in Python with
``register_method`` live in that process only and are not offered by the CLI.
"""

BUILTIN_METHODS: tuple[str, ...] = (
    "ablationcam",
    "cam",
    "eigencam",
    "gradcam",
    "gradcampp",
    "gradxinput",
    "guided-gradcam",
    "guided-hirescam",
    "guidedbackprop",
    "hirescam",
    "layercam",
    "occlusion",
    "scorecam",
    "xgradcam",
)
