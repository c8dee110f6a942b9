"""Model zoo registry, bundle save/load round trip, safe loading and every error case.

Zoo entries are read through :class:`hirescam3d.models.handle.ModelHandle` (the one object
front ends ask); ``zoo.load`` is its shortcut.
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn

from hirescam3d.errors import ModelError
from hirescam3d.models import zoo
from hirescam3d.models.bundle import (
    INFERENCE,
    METADATA,
    WEIGHTS,
    InputSpec,
    ModelInfo,
    load_bundle,
    load_weights,
    preprocessing_transforms,
    read_info,
    save_bundle,
)
from hirescam3d.models.handle import ModelHandle
from hirescam3d.models.nets import AxialNet


def small_axialnet() -> AxialNet:
    torch.manual_seed(0)
    return AxialNet(
        ["a", "b", "c"],
        input_size=(6, 64, 64),
        trunk_widths=(8, 8),
        trunk_blocks=(1, 1),
        trunk_strides=(1, 2),
        reduce_channels=(8, 8, 4, 4),
        reduce_norm=True,
        reduce_padding=1,
    ).eval()


def small_info(net: AxialNet) -> ModelInfo:
    spec = InputSpec(3, 1, (6, 64, 64), "SPL", (3.0, 2.5, 2.5), (-1000.0, 200.0))
    return ModelInfo(
        name="small",
        description="a small AxialNet for tests",
        class_names=net.class_names,
        target_layer="to_volume",
        input=spec,
        preprocessing=preprocessing_transforms(spec),
        task="multilabel",
        guaranteed=True,
        trained=False,
    )


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    net = small_axialnet()
    return save_bundle(net, small_info(net), tmp_path / "bundle")


def test_names_and_entries():
    names = zoo.names()
    assert names[0] == "demo"
    assert {"axialnet", "axialnet_tiny", "resnet34v", "densenet121v"} <= set(names)
    assert {"resnet18_cam_3d", "resnet18_cam_2d", "densenet121_cam_3d"} <= set(names)
    voc = ModelHandle.resolve("resnet34v")
    assert len(voc.class_names) == 20 and voc.class_names[0] == "aeroplane"
    assert voc.class_names[-1] == "tvmonitor" and "diningtable" in voc.class_names
    assert voc.default_layer == "head" and voc.input.in_channels == 3
    assert voc.input_shape == (3, 224, 224) and voc.audit_input_shape == (3, 224, 224)
    tiny = ModelHandle.resolve("axialnet_tiny")
    assert tiny.input.axcodes == "SPL" and tiny.input.spatial_size == (96, 128, 128)
    assert tiny.input.spacing == (3.0, 2.5, 2.5) and tiny.task == "multilabel"
    assert zoo.entry("axialnet_tiny").info.class_names == tiny.class_names


def test_chest_findings_match_the_phantom():
    from hirescam3d.data.phantom import FINDINGS

    assert zoo.CHEST_FINDINGS == FINDINGS
    assert ModelHandle.resolve("demo").class_names == FINDINGS


def _slow(name: str):
    heavy = ("axialnet", "densenet121v", "resnet18_cam_3d", "densenet121_cam_3d")
    return pytest.param(name, marks=pytest.mark.slow) if name in heavy else name


@pytest.mark.parametrize("name", [_slow(n) for n in zoo.names()])
def test_cached_guarantee_is_the_computed_one(name):
    """The zoo's cached flag (what `hirescam3d models` lists) equals the audit's verdict
    at the default layer, and the default layer is one `layers` lists."""
    handle = ModelHandle.resolve(name)
    verdict = handle.audit()
    assert verdict.layer == handle.default_layer and verdict.default
    assert verdict.guaranteed is handle.declared_guaranteed is True, verdict.reason
    assert verdict.completeness_error < 1e-3 and verdict.linearity_error < 1e-3
    assert handle.audit() is verdict  # cached per handle


def test_preprocessing_spec_order_and_values():
    steps = ModelHandle.resolve("axialnet_tiny").preprocessing
    assert [s["_target_"] for s in steps] == [
        "LoadImaged",
        "EnsureChannelFirstd",
        "Orientationd",
        "Spacingd",
        "ScaleIntensityRanged",
        "ResizeWithPadOrCropd",
    ]
    assert steps[2]["axcodes"] == "SPL" and steps[3]["pixdim"] == [3.0, 2.5, 2.5]
    window = ModelHandle.resolve("axialnet_tiny").input.window
    assert (steps[4]["a_min"], steps[4]["a_max"]) == window
    assert steps[4]["clip"] is True and (steps[4]["b_min"], steps[4]["b_max"]) == (0.0, 1.0)
    assert steps[5]["spatial_size"] == [96, 128, 128]
    photo = [s["_target_"] for s in ModelHandle.resolve("resnet34v").preprocessing]
    assert "Orientationd" not in photo and photo[-1] == "Resized"


def test_preprocessing_runs_in_monai_and_orients_to_spl(tmp_path):
    import monai.transforms as mt

    # A RAS volume at 2 mm with a bright block at the superior, anterior, right corner.
    data = np.full((40, 40, 40), -1000, dtype=np.int16)
    data[34:, 34:, 34:] = 100  # RAS+: x large = right, y large = anterior, z large = superior
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 2.0, 1.0])), path)
    steps = ModelHandle.resolve("axialnet_tiny").preprocessing
    pipeline = mt.Compose(
        [
            getattr(mt, s["_target_"])(**{k: v for k, v in s.items() if k != "_target_"})
            for s in steps
        ]
    )
    out = pipeline({"image": str(path)})["image"]
    assert tuple(out.shape) == (1, 96, 128, 128)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    hot = np.argwhere(out[0].numpy() > 0.5)
    centre = hot.mean(0)
    # S is axis 0 (index up = superior), P axis 1 (up = posterior), L axis 2 (up = left).
    assert centre[0] > 48 and centre[1] < 64 and centre[2] < 64


def test_load_untrained_is_seeded_and_eval():
    net1, info = zoo.load("axialnet_tiny")
    net2, _ = zoo.load("axialnet_tiny")
    net3, _ = zoo.load("axialnet_tiny", seed=1)
    assert not net1.training and info.trained is False and info.bundle_path is None
    w1, w2, w3 = (n.trunk.stem.conv.weight for n in (net1, net2, net3))
    assert torch.equal(w1, w2) and not torch.equal(w1, w3)
    assert info.target_layer == "to_volume" and info.guaranteed


def test_unknown_name_suggests_close_matches():
    with pytest.raises(ModelError, match="unknown model 'resnet34'") as err:
        zoo.load("resnet34")
    assert "Did you mean 'resnet34v'" in str(err.value)
    assert "densenet121v" in str(err.value)  # the list of valid names


def test_missing_bundle_path():
    with pytest.raises(ModelError, match=r"^\./no/such/bundle: .*no such bundle folder"):
        zoo.load("./no/such/bundle")


def test_round_trip_gives_identical_outputs(bundle):
    net = small_axialnet()
    loaded, info = zoo.load(bundle)
    assert isinstance(loaded, AxialNet) and not loaded.training
    x = torch.rand(2, 1, 6, 64, 64)
    with torch.no_grad():
        assert torch.equal(net(x), loaded(x))
    assert info.class_names == ("a", "b", "c") and info.target_layer == "to_volume"
    assert info.input.axcodes == "SPL" and info.input.window == (-1000.0, 200.0)
    assert info.preprocessing[2]["axcodes"] == "SPL"
    assert info.bundle_path == bundle.resolve() and len(info.weights_sha256) == 64
    meta = json.loads((bundle / METADATA).read_text())
    assert meta["hirescam3d"]["weights_sha256"] == info.weights_sha256
    for key in ("version", "monai_version", "pytorch_version", "network_data_format"):
        assert key in meta
    channels = meta["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert channels == {"0": "a", "1": "b", "2": "c"}
    assert (bundle / "docs" / "README.md").is_file() and (bundle / "LICENSE").is_file()


def test_missing_files(bundle):
    (bundle / METADATA).unlink()
    with pytest.raises(ModelError, match=r"metadata\.json is missing"):
        load_bundle(bundle)


def test_missing_weights(bundle):
    (bundle / WEIGHTS).unlink()
    with pytest.raises(ModelError, match=r"model\.pt is missing"):
        load_bundle(bundle)


def test_invalid_json(bundle):
    (bundle / INFERENCE).write_text('{"network_def": {"_target_": ')
    with pytest.raises(ModelError, match=r"inference\.json: invalid JSON \(line 1"):
        load_bundle(bundle)


def _rewrite_weights(bundle: Path, state: dict) -> None:
    torch.save(state, bundle / WEIGHTS)
    meta = json.loads((bundle / METADATA).read_text())
    meta["hirescam3d"]["weights_sha256"] = None
    (bundle / METADATA).write_text(json.dumps(meta))


def test_wrong_keys(bundle):
    state = small_axialnet().state_dict()
    state["extra.weight"] = state.pop("fc.weight")
    _rewrite_weights(bundle, state)
    with pytest.raises(ModelError, match=r"model\.pt.*1 missing \(e\.g\. fc\.weight\).*extra"):
        load_bundle(bundle)


def test_wrong_shapes(bundle):
    state = small_axialnet().state_dict()
    state["fc.weight"] = torch.zeros(5, 4, 1, 8, 8)
    _rewrite_weights(bundle, state)
    with pytest.raises(ModelError, match=r"'fc\.weight' has shape \(5, 4, 1, 8, 8\)"):
        load_bundle(bundle)


def test_truncated_weights(bundle):
    data = (bundle / WEIGHTS).read_bytes()
    (bundle / WEIGHTS).write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match=r"model\.pt: cannot read the checkpoint \(truncated"):
        load_bundle(bundle)


def test_changed_weights_fail_the_checksum(bundle):
    state = small_axialnet().state_dict()
    state["fc.bias"] = state["fc.bias"] + 1
    torch.save(state, bundle / WEIGHTS)
    with pytest.raises(ModelError, match="sha256"):
        load_bundle(bundle)


class Payload:
    """Unpickling this would run code: it must never happen."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_pickled_code_is_refused(bundle, tmp_path):
    marker = tmp_path / "pwned"
    state = dict(small_axialnet().state_dict())
    state["payload"] = Payload(marker)
    _rewrite_weights(bundle, state)
    with pytest.raises(ModelError, match=r"model\.pt: refused: the checkpoint holds pickled"):
        load_bundle(bundle)
    assert not marker.exists()
    with pytest.raises(ModelError, match="refused"):
        load_weights(bundle / WEIGHTS)


def test_non_tensor_checkpoint(tmp_path):
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tmp_path / "nested.pt")
    with pytest.raises(ModelError, match="save that instead"):
        load_weights(tmp_path / "nested.pt")


def test_unlisted_architecture_is_never_built(bundle):
    cfg = json.loads((bundle / INFERENCE).read_text())
    cfg["network_def"] = {"_target_": "os.system", "command": "echo hi"}
    (bundle / INFERENCE).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="refusing to build _target_ 'os.system'"):
        load_bundle(bundle)


def test_bad_network_kwargs(bundle):
    cfg = json.loads((bundle / INFERENCE).read_text())
    cfg["network_def"]["no_such_option"] = 3
    (bundle / INFERENCE).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="cannot build .*no_such_option"):
        load_bundle(bundle)


def test_missing_metadata_key(bundle):
    meta = json.loads((bundle / METADATA).read_text())
    del meta["hirescam3d"]["target_layer"]
    (bundle / METADATA).write_text(json.dumps(meta))
    with pytest.raises(ModelError, match="missing key 'target_layer'"):
        load_bundle(bundle)


def test_unknown_preprocessing_transform(bundle):
    cfg = json.loads((bundle / INFERENCE).read_text())
    cfg["preprocessing"]["transforms"].append({"_target_": "Lambdad", "func": "$os.system"})
    (bundle / INFERENCE).write_text(json.dumps(cfg))
    with pytest.raises(ModelError, match="preprocessing.transforms"):
        load_bundle(bundle)


def test_saving_a_foreign_network_is_refused(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 1, 1))
    with pytest.raises(ModelError, match="not a hirescam3d zoo architecture"):
        save_bundle(net, small_info(small_axialnet()), tmp_path / "x")


def test_shipped_demo_bundle():
    if not zoo.DEMO_BUNDLE.is_dir():
        pytest.skip("demo bundle not built yet")
    net, info = zoo.load()
    assert isinstance(net, AxialNet) and not net.training
    assert info.name == "demo" and info.trained and info.class_names == zoo.CHEST_FINDINGS
    assert info.target_layer == "to_volume" and info.guaranteed
    size = sum(f.stat().st_size for f in zoo.DEMO_BUNDLE.rglob("*") if f.is_file())
    assert size <= 20 * 2**20
    copy_net, _ = zoo.load(str(zoo.DEMO_BUNDLE))
    x = torch.rand(1, 1, 96, 128, 128)
    with torch.no_grad():
        assert torch.equal(net(x), copy_net(x))


def test_demo_bundle_copy_loads(tmp_path):
    if not zoo.DEMO_BUNDLE.is_dir():
        pytest.skip("demo bundle not built yet")
    shutil.copytree(zoo.DEMO_BUNDLE, tmp_path / "demo_copy")
    _, info = zoo.load(tmp_path / "demo_copy")
    assert info.bundle_path == (tmp_path / "demo_copy").resolve()


def test_read_class_names_without_weights(tmp_path):
    from hirescam3d.models.bundle import read_class_names

    demo = ModelHandle.resolve("demo")
    assert read_class_names(demo.bundle_path) == demo.class_names == zoo.CHEST_FINDINGS
    meta = tmp_path / "configs" / "metadata.json"
    meta.parent.mkdir()
    meta.write_text('{"hirescam3d": {"class_names": "atelectasis"}}')
    with pytest.raises(ModelError, match="class_names must be a list"):
        read_class_names(tmp_path)
    with pytest.raises(ModelError, match="is missing"):
        read_class_names(tmp_path / "nowhere")


def test_read_info_reads_configs_only(bundle):
    (bundle / WEIGHTS).unlink()  # not needed: nothing is built or loaded
    info = read_info(bundle)
    assert info.class_names == ("a", "b", "c") and info.target_layer == "to_volume"
    assert info.input.spatial_size == (6, 64, 64) and info.guaranteed is True
    assert info.bundle_path == bundle.resolve() and len(info.weights_sha256) == 64
    with pytest.raises(ModelError, match=r"model\.pt is missing"):
        load_bundle(bundle)


def test_zoo_load_is_the_handle_shortcut():
    net, info = zoo.load("axialnet_tiny", seed=3)
    built = ModelHandle.resolve("axialnet_tiny", seed=3).build()
    assert torch.equal(net.trunk.stem.conv.weight, built.trunk.stem.conv.weight)
    assert info.name == "axialnet_tiny" and info.trained is False
