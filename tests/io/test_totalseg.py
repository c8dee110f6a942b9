"""TotalSegmentator v2's multilabel file: label names from the NIfTI header extension."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from hirescam3d.errors import InputError
from hirescam3d.io.organs import load_organ_map


def caret_xml(names: dict[int, str]) -> bytes:
    """A label table laid out as TotalSegmentator's ``add_label_map_to_nifti`` writes it
    (Caret XML in a code-0 extension, CDATA names, trailing spaces)."""
    rows = "".join(
        f'<Label Key="{k}" Red="1.0" Green="0.0" Blue="0.0" Alpha="1"><![CDATA[{v}]]></Label>\n'
        for k, v in names.items()
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?> <CaretExtension>  <Date><![CDATA[2013-07-14T'
        '05:45:09]]></Date>   <VolumeInformation Index="0">   <LabelTable>\n' + rows
        + "\n  </LabelTable>  <StudyMetaDataLinkSet>  </StudyMetaDataLinkSet>  <VolumeType>"
        "<![CDATA[Label]]></VolumeType>   </VolumeInformation></CaretExtension>\n    "
    ).encode()


def multilabel(path, names: dict[int, str], xml: bytes | None = None):
    data = np.zeros((6, 5, 4), np.uint8)
    for k in names:
        data[k % 6, :, :2] = k
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 2.0, 1.0]))
    img.header.extensions.append(nib.nifti1.Nifti1Extension(0, xml or caret_xml(names)))
    nib.save(img, str(path))
    return data


def test_names_from_the_header_extension(tmp_path):
    names = {1: "spleen", 2: "kidney_right", 5: "lung_upper_lobe_left"}
    data = multilabel(tmp_path / "ts.nii.gz", names)
    labels, affine, read = load_organ_map(tmp_path / "ts.nii.gz")
    assert read == names
    np.testing.assert_array_equal(labels, data)


def test_a_names_file_still_wins(tmp_path):
    multilabel(tmp_path / "ts.nii.gz", {1: "spleen", 2: "liver"})
    (tmp_path / "names.json").write_text('{"1": "a", "2": "b"}')
    _, _, read = load_organ_map(tmp_path / "ts.nii.gz", tmp_path / "names.json")
    assert read == {1: "a", 2: "b"}


def test_broken_label_table_is_one_line(tmp_path):
    multilabel(tmp_path / "ts.nii.gz", {1: "spleen"}, b"<CaretExtension><LabelTable>")
    with pytest.raises(InputError, match="not valid XML") as err:
        load_organ_map(tmp_path / "ts.nii.gz")
    assert "\n" not in str(err.value)
