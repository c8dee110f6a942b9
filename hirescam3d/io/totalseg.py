"""Label names that TotalSegmentator v2 stores in its multilabel NIfTI (``--ml``).

TotalSegmentator writes them as a NIfTI header extension (code 0) holding a Caret XML
label table: ``<CaretExtension> ... <LabelTable><Label Key="1" ...><![CDATA[spleen]]>
</Label> ...``. :func:`header_label_names` reads that table with the standard library's
XML parser (no entity expansion beyond XML's own); files without one give ``{}``.
"""

from __future__ import annotations

from pathlib import Path

from hirescam3d.errors import InputError


def _label_table(xml: bytes, path: Path) -> dict[int, str]:
    """``{key: name}`` of a Caret ``LabelTable``; InputError for a malformed one."""
    import xml.etree.ElementTree as ET

    try:
        root = ET.fromstring(xml.rstrip(b"\x00 \n"))
    except ET.ParseError as err:
        raise InputError(f"{path}: its NIfTI header's label table is not valid XML ({err})") \
            from None
    names: dict[int, str] = {}
    for label in root.iter("Label"):
        try:
            names[int(label.get("Key", ""))] = (label.text or "").strip()
        except ValueError:
            raise InputError(
                f"{path}: a label of its NIfTI header's label table has no integer Key"
            ) from None
    return names


def header_label_names(path: str | Path) -> dict[int, str]:
    """``{label: name}`` from a NIfTI's Caret label-table extension (TotalSegmentator v2's
    multilabel output); ``{}`` for other files or NIfTIs without one."""
    path = Path(path)
    if not path.name.lower().endswith((".nii", ".nii.gz")):
        return {}
    import nibabel as nib

    try:
        extensions = nib.load(str(path)).header.extensions
    except Exception:  # the caller's reader reports unreadable files
        return {}
    for ext in extensions:
        content = ext.get_content()
        if isinstance(content, bytes) and b"<CaretExtension" in content:
            return _label_table(content, path)
    return {}
