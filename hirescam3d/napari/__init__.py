"""napari plugin of hirescam3d (npe2 manifest ``napari.yaml``).

Contributions: a reader for CT scans, organ label maps and explanation maps (NIfTI, NRRD,
MHA, DICOM folders), a NIfTI writer for explanation layers, sample data (the demo chest CT
with organs and precomputed HiResCAM / Grad-CAM maps) and the "Explain" dock widget.

Importing this package does not import napari or Qt: the modules named in the manifest
are imported by napari only when a contribution is used.

Display convention of every layer this plugin makes: array axes (superior, posterior,
patient left), so the slider scrolls axial slices, anterior is at the top and the
patient's right is on the image left (radiological view). World coordinates are mm along
those axes: ``scale`` is the voxel spacing and ``translate`` the first voxel's position.
"""
