"""Bring your own MONAI bundle: bundles written here in MONAI's own format (a 3D UNet
segmentation bundle and a DenseNet121 classification bundle) load like the network built
directly with ``monai.networks.nets``; class names, task, preprocessing and the default
layer come out as written (the layer as determined by hand); malicious variants are
refused with one line, and nothing in them runs."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from monai.bundle import ConfigParser
from monai.networks.nets import DenseNet121, SegResNet, UNet
from torch import nn

from hirescam3d import Explainer
from hirescam3d.errors import ModelError
from hirescam3d.models.bundle import (
    INFERENCE,
    METADATA,
    WEIGHTS,
    InputSpec,
    ModelInfo,
    load_bundle,
    preprocessing_transforms,
    read_info,
    save_bundle,
)
from hirescam3d.models.handle import ModelHandle
from tests.conftest import installed_console_script
from tests.models.test_zoo import Payload

UNET_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 3,
    "channels": [4, 8],
    "strides": [2],
    "num_res_units": 1,
    "norm": "batch",
}
UNET_CLASSES = {"0": "background", "1": "liver", "2": "tumour"}
# A typical MONAI CT preprocessing (spleen_ct_segmentation style), one name spelled long.
CT_PREPROCESSING: list[dict[str, Any]] = [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
    {"_target_": "monai.transforms.Spacingd", "keys": "image", "pixdim": [1.5, 1.5, 2.0],
     "mode": "bilinear"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": -57, "a_max": 164,
     "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"_target_": "EnsureTyped", "keys": "image", "_desc_": "a tensor"},
]  # fmt: skip

DENSE_ARGS: dict[str, Any] = {"spatial_dims": 2, "in_channels": 1, "out_channels": 3}
DENSE_CLASSES = ["normal", "benign", "malignant"]
PHOTO_PREPROCESSING: list[dict[str, Any]] = [
    {"_target_": "LoadImaged", "keys": "image"},
    {"_target_": "EnsureChannelFirstd", "keys": "image"},
    {"_target_": "ScaleIntensityRanged", "keys": "image", "a_min": 0, "a_max": 255,
     "b_min": 0.0, "b_max": 1.0, "clip": True},
    {"_target_": "Resized", "keys": "image", "spatial_size": [64, 64]},
]  # fmt: skip


pytestmark = pytest.mark.usefixtures("one_thread")


def seeded(build: Any, seed: int, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    net = build(**kwargs)
    for m in net.modules():  # non-trivial running statistics, so that they matter
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    return net.eval()


def write_bundle(
    folder: Path,
    network_def: dict[str, Any],
    metadata: dict[str, Any],
    state: dict[str, torch.Tensor],
    preprocessing: list[dict[str, Any]] | None = None,
    postprocessing: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """A bundle folder in MONAI's format, with the expressions MONAI bundles carry in the
    entries hirescam3d does not use (``network``, ``inferer``, ``device``)."""
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference: dict[str, Any] = {
        "imports": ["$import glob"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": network_def,
        "network": "$@network_def.to(@device)",
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [32, 32, 32]},
        # what MONAI would run: hirescam3d never evaluates it
        "initialize": [f"$open({str(folder / 'pwned')!r}, 'w').close()"],
        **(extra or {}),
    }
    if preprocessing is not None:
        inference["preprocessing"] = {"_target_": "Compose", "transforms": preprocessing}
    if postprocessing is not None:
        inference["postprocessing"] = {"_target_": "Compose", "transforms": postprocessing}
    (folder / METADATA).write_text(json.dumps(metadata, indent=2))
    (folder / INFERENCE).write_text(json.dumps(inference, indent=2))
    torch.save(state, folder / WEIGHTS)
    return folder


def unet_metadata(channel_def: dict[str, str] = UNET_CLASSES) -> dict[str, Any]:
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
        "0.8.1/meta_schema_20220324.json",
        "version": "0.1.0",
        "name": "Tiny liver segmentation",
        "description": "A tiny 3D UNet for tests",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "hounsfield", "modality": "CT",
                    "num_channels": 1, "spatial_shape": [32, 32, 32], "dtype": "float32",
                    "value_range": [0, 1], "is_patch_data": True,
                    "channel_def": {"0": "image"},
                }
            },
            "outputs": {
                "pred": {
                    "type": "image", "format": "segmentation", "num_channels": 3,
                    "spatial_shape": [32, 32, 32], "dtype": "float32", "value_range": [0, 1],
                    "is_patch_data": True, "channel_def": channel_def,
                }
            },
        },
    }  # fmt: skip


SEG_POSTPROCESSING: list[dict[str, Any]] = [
    {"_target_": "Activationsd", "keys": "pred", "softmax": True},
    {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing",
     "orig_keys": "image"},
    {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
]  # fmt: skip


def dense_metadata() -> dict[str, Any]:
    return {
        "version": "0.1.0",
        "name": "Tiny lesion classifier",
        "description": "DenseNet121 for tests",
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image", "format": "magnitude", "modality": "US",
                    "num_channels": 1, "spatial_shape": [64, 64], "dtype": "float32",
                    "is_patch_data": False,
                }
            },
            "outputs": {
                "pred": {
                    "type": "probabilities", "format": "classes", "num_channels": 3,
                    "spatial_shape": [1], "dtype": "float32", "activation": "sigmoid",
                    "class_names": DENSE_CLASSES,
                }
            },
        },
    }  # fmt: skip


@pytest.fixture(scope="module")
def unet_state() -> dict[str, torch.Tensor]:
    return seeded(UNet, 0, **UNET_ARGS).state_dict()


@pytest.fixture()
def unet_bundle(tmp_path: Path, unet_state: dict[str, torch.Tensor]) -> Path:
    return write_bundle(
        tmp_path / "unet", {"_target_": "UNet", **UNET_ARGS}, unet_metadata(), unet_state,
        CT_PREPROCESSING, SEG_POSTPROCESSING,
    )  # fmt: skip


@pytest.fixture(scope="module")
def dense(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, ModelHandle]:
    """The DenseNet121 bundle, loaded once (its trace is the slow part of this file)."""
    state = seeded(DenseNet121, 1, **DENSE_ARGS).state_dict()
    folder = write_bundle(
        tmp_path_factory.mktemp("dense") / "densenet",
        {"_target_": "monai.networks.nets.DenseNet121", **DENSE_ARGS},
        dense_metadata(), state, PHOTO_PREPROCESSING,
    )  # fmt: skip
    handle = ModelHandle.resolve(str(folder))
    handle.load()
    return folder, state, handle


def refusal(call: Any) -> str:
    """The message of the ModelError ``call()`` raises; it must be one line."""
    with pytest.raises(ModelError) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and text.strip() == text
    return text


# -- the UNet segmentation bundle ---------------------------------------------------------
def test_unet_bundle_metadata_is_read_without_weights(unet_bundle):
    (unet_bundle / WEIGHTS).unlink()  # configs only
    handle = ModelHandle.resolve(str(unet_bundle))
    assert handle.source == "bundle" and handle.name == "Tiny liver segmentation"
    assert handle.class_names == ("background", "liver", "tumour")
    assert handle.kind == "segmentation" and handle.info.patch is True
    assert handle.task == "multiclass" and handle.activation == "softmax"
    assert handle.input_shape == (1, 32, 32, 32)
    assert handle.architecture == "monai.networks.nets.UNet"
    spec = handle.input
    assert spec.axcodes == "RAS" and spec.spacing == (1.5, 1.5, 2.0)
    assert spec.window == (-57.0, 164.0) and spec.modality == "CT"
    expected = [
        {k: v for k, v in t.items() if k != "_desc_"} | {"_target_": t["_target_"].split(".")[-1]}
        for t in CT_PREPROCESSING
    ]
    assert handle.preprocessing == expected
    assert handle.notes == ()


def test_unet_bundle_loads_like_the_network_built_directly(unet_bundle, unet_state):
    marker = unet_bundle / "pwned"  # the bundle's "$..." entries outside network_def never run
    handle = ModelHandle.resolve(str(unet_bundle))
    network, info = handle.load()
    direct = seeded(UNet, 7, **UNET_ARGS)
    x = torch.rand(2, 1, 32, 32, 32)
    with torch.no_grad():
        before = direct(x)
        direct.load_state_dict(unet_state)
        expected = direct(x)
        assert not torch.allclose(before, expected)  # the weights matter
        assert torch.equal(network(x), expected)
    assert not network.training and not marker.exists()
    # MONAI's own reader of the format builds the same network and preprocessing.
    parser = ConfigParser()
    parser.read_config(str(unet_bundle / INFERENCE))
    monai_net = parser.get_parsed_content("network_def")
    monai_net.load_state_dict(torch.load(unet_bundle / WEIGHTS, weights_only=True))
    with torch.no_grad():
        assert torch.equal(monai_net.eval()(x), expected)
    monai_pre = parser.get_parsed_content("preprocessing").transforms
    assert [type(t).__name__ for t in monai_pre] == [t["_target_"] for t in info.preprocessing]
    assert info.bundle_format == "monai" and info.kind == "segmentation"
    assert info.class_names == ("background", "liver", "tumour")
    assert len(info.weights_sha256) == 64


def test_unet_default_layer_is_the_last_map_before_the_output_convolution(unet_bundle):
    handle = ModelHandle.resolve(str(unet_bundle))
    network, info = handle.load()
    # By hand: MONAI UNet = Sequential(down, SkipConnection, up); up = Sequential(transposed
    # conv + norm + PReLU ("model.2.0"), ResidualUnit with a conv-only output ("model.2.1")).
    # Only model.2.1's convolution and identity residual follow model.2.0.
    assert isinstance(network.model[2][1].conv.unit0.conv, nn.Conv3d)
    assert info.target_layer == "model.2.0" == handle.default_layer and info.guaranteed
    verdict = handle.audit()
    assert verdict.default and verdict.guaranteed and verdict.bias_uniform
    # The guarantee, checked independently: over a region, HiResCAM's cells sum to the
    # region score minus the output convolution's bias times the region's size.
    bias = network.model[2][1].conv.unit0.conv.bias.detach()
    x = torch.rand(1, 1, 32, 32, 32)
    region = torch.zeros(1, 1, 32, 32, 32, dtype=torch.bool)
    region[..., 8:20, 4:30, 10:16] = True
    explainer = Explainer(network, info.target_layer, task=info.activation)
    result = explainer.explain(x, [1], ["hirescam"], maps=False, region=region)["hirescam"]
    with torch.no_grad():
        score = network(x)[0, 1][region[0, 0]].double().sum()
    total = result.raw[0, 0].double().sum()
    assert torch.allclose(total, score - bias[1].double() * int(region.sum()), rtol=1e-4)
    # task reached the Explainer: the predicted region of a softmax model is its argmax
    assert explainer.task == "softmax"


@pytest.mark.parametrize(
    ("build", "kwargs", "layer"),
    [
        # no residual units: the last up layer is the output conv itself; before it, the
        # skip connection's concatenation
        (UNet, {**UNET_ARGS, "num_res_units": 0}, "model.1"),
        # conv_final = Sequential(GroupNorm, act_mod (in-place ReLU), 1x1 conv)
        (
            SegResNet,
            {
                "spatial_dims": 3,
                "init_filters": 8,
                "in_channels": 1,
                "out_channels": 3,
                "blocks_down": [1, 1],
                "blocks_up": [1],
            },
            "act_mod",
        ),
    ],  # fmt: skip
)
def test_default_layer_of_other_segmentation_networks(tmp_path, build, kwargs, layer):
    state = seeded(build, 0, **kwargs).state_dict()
    folder = write_bundle(
        tmp_path / "b", {"_target_": build.__name__, **kwargs}, unet_metadata(), state,
        CT_PREPROCESSING, SEG_POSTPROCESSING,
    )  # fmt: skip
    network, info = ModelHandle.resolve(str(folder)).load()
    assert info.target_layer == layer and info.guaranteed and not info.notes
    assert isinstance(dict(network.named_modules())[layer], nn.Module)


def test_no_guaranteed_layer_falls_back_to_the_last_convolution():
    # A sigmoid after the linear head: every layer is followed by a nonlinearity.
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2), nn.Sigmoid(),
    ).eval()  # fmt: skip
    handle = ModelHandle.from_network(net, ["a", "b"], input_shape=(1, 8, 8))
    _, info = handle.load()
    assert info.target_layer == "2" == handle.default_layer  # the last Conv2d, by hand
    assert info.guaranteed is False
    (note,) = handle.notes
    assert "no layer of this network has a HiResCAM guarantee" in note
    assert "the last convolutional layer, '2'" in note


def test_metadata_variants_of_class_names_and_activation(tmp_path, unet_state):
    meta = unet_metadata()
    pred = meta["network_data_format"]["outputs"]["pred"]
    pred["channel_def"] = {"2": "tumour", "0": "background", "1": "liver"}  # any key order
    folder = write_bundle(tmp_path / "a", {"_target_": "UNet", **UNET_ARGS}, meta, unet_state)
    info = read_info(folder)
    assert info.class_names == ("background", "liver", "tumour")
    assert info.task == "multiclass" and info.preprocessing == []
    assert "assuming softmax" in info.notes[0]
    post = [{"_target_": "monai.transforms.Activationsd", "keys": "pred", "sigmoid": True}]
    folder = write_bundle(
        tmp_path / "b", {"_target_": "UNet", **UNET_ARGS}, meta, unet_state, None, post
    )
    assert read_info(folder).activation == "sigmoid" and read_info(folder).notes == ()
    del pred["channel_def"]
    folder = write_bundle(tmp_path / "c", {"_target_": "UNet", **UNET_ARGS}, meta, unet_state)
    text = refusal(lambda: ModelHandle.resolve(str(folder)).class_names)
    assert "metadata.json" in text and "channel_def" in text and "class_names" in text


def test_wrong_number_of_classes_is_refused_on_load(tmp_path, unet_state):
    meta = unet_metadata({"0": "background", "1": "liver"})
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
    folder = write_bundle(tmp_path / "a", {"_target_": "UNet", **UNET_ARGS}, meta, unet_state)
    text = refusal(ModelHandle.resolve(str(folder)).load)
    assert "names 2 classes" in text and "outputs 3 channels" in text


# -- the DenseNet121 classification bundle ------------------------------------------------
def test_densenet_bundle_loads_like_the_network_built_directly(dense):
    folder, state, handle = dense
    network, info = handle.load()
    direct = seeded(DenseNet121, 5, **DENSE_ARGS)
    direct.load_state_dict(state)
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        assert torch.equal(network(x), direct(x))
    assert info.class_names == tuple(DENSE_CLASSES) and info.kind == "classification"
    assert info.task == "multilabel" and info.activation == "sigmoid"  # from the metadata
    assert handle.input_shape == (1, 64, 64)
    assert info.input.size_mode == "resize" and info.input.window == (0.0, 255.0)
    assert [t["_target_"] for t in info.preprocessing] == [
        t["_target_"] for t in PHOTO_PREPROCESSING
    ]


def test_densenet_default_layer_is_the_relu_before_global_pooling(dense):
    _, _, handle = dense
    network, info = handle.load()
    # By hand: class_layers = (relu, adaptive average pool, flatten, linear). The pool's
    # output is one cell; the in-place ReLU before it is the deepest map with only linear
    # operations after it (features.norm5, the same tensor, is followed by that ReLU).
    assert list(dict(network.class_layers.named_children())) == ["relu", "pool", "flatten", "out"]
    assert info.target_layer == "class_layers.relu" and info.guaranteed and not info.notes
    # Independently: the HiResCAM cells sum to the logit minus the linear layer's bias.
    x = torch.rand(1, 1, 64, 64)
    result = Explainer(network, info.target_layer).explain(x, [2], ["hirescam"], maps=False)
    with torch.no_grad():
        logit = network(x)[0, 2].double()
    total = result["hirescam"].raw[0, 0].double().sum()
    bias = network.class_layers.out.bias[2].double()
    assert torch.allclose(total, logit - bias, rtol=1e-4, atol=1e-5)


# -- malicious bundles --------------------------------------------------------------------
def _unet_def(**changes: Any) -> dict[str, Any]:
    return {"_target_": "UNet", **UNET_ARGS, **changes}


UNET_ATTACKS = {
    "os.system target": (
        {"_target_": "os.system", "command": "touch pwned"},
        "refusing to build _target_ 'os.system'",
    ),
    "$ expression target": (
        {"_target_": "$__import__('os').system('touch pwned')"},
        'refusing to build _target_ "$__import__',
    ),
    "$ expression argument": (
        _unet_def(channels="$__import__('os').system('touch pwned') or [4, 8]"),
        "network_def::channels is the expression",
    ),
    "$ call outside the allow-list": (
        _unet_def(channels="$open('pwned', 'w') and [4, 8]"),
        "the name 'open' is not allowed",
    ),
    "$ attribute outside monai, numpy, torch": (
        _unet_def(channels="$torch.load.__globals__"),
        "names with '__' are not allowed",
    ),
    "@ reference to nothing": (
        _unet_def(out_channels="@num_classes"),
        "network_def::out_channels refers to '@num_classes', which the config does not define",
    ),
    "nested _target_": (
        _unet_def(act={"_target_": "os.system", "command": "touch pwned"}),
        "network_def.act holds the special key '_target_'",
    ),
}


@pytest.mark.parametrize("attack", list(UNET_ATTACKS))
def test_malicious_unet_bundles_are_refused_in_one_line(tmp_path, unet_state, monkeypatch, attack):
    monkeypatch.chdir(tmp_path)
    network_def, expected = UNET_ATTACKS[attack]
    folder = write_bundle(tmp_path / "evil", network_def, unet_metadata(), unet_state)
    handle = ModelHandle.resolve(str(folder))
    assert handle.class_names == ("background", "liver", "tumour")  # metadata still lists
    text = refusal(handle.load)
    assert expected in text and str(folder / INFERENCE) in text
    if "$" in str(network_def):
        assert "--trust-bundle" in text
    assert not (tmp_path / "pwned").exists() and not handle.loaded


@pytest.mark.parametrize(
    ("transform", "expected"),
    [
        ({"_target_": "Lambdad", "keys": "image", "func": "$lambda x: x"},
         "preprocessing::transforms::6::func is the expression '$lambda x: x'"),
        ({"_target_": "os.system", "command": "touch pwned"},
         "preprocessing transform 6 has _target_ 'os.system', which is not a MONAI"),
        ({"_target_": "Spacingd", "keys": "image", "pixdim": "$__import__('os')"},
         "preprocessing::transforms::6::pixdim is the expression"),
        ({"_target_": "EnsureTyped", "keys": "image", "device": "@gpu"},
         "preprocessing::transforms::6::device refers to '@gpu'"),
    ],
)  # fmt: skip
def test_malicious_preprocessing_is_refused_in_one_line(tmp_path, unet_state, transform, expected):
    folder = write_bundle(
        tmp_path / "evil", _unet_def(), unet_metadata(), unet_state,
        [*CT_PREPROCESSING, transform],
    )  # fmt: skip
    text = refusal(lambda: read_info(folder))
    assert expected in text and str(folder / INFERENCE) in text
    assert "--trust-bundle" in text or "does not define" in text
    assert not (tmp_path / "evil" / "pwned").exists()


def test_malicious_densenet_bundles_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    state = {"w": torch.zeros(1)}  # never read: the network_def is refused first
    cases = {
        "pretrained": ({"_target_": "DenseNet121", **DENSE_ARGS, "pretrained": True},
                       "pretrained=True would download weights"),
        "exec": ({"_target_": "exec", "source": "open('pwned', 'w')"},
                 "refusing to build _target_ 'exec'"),
        "kwargs": ({"_target_": "DenseNet121", **DENSE_ARGS,
                    "out_channels": "$open('pwned', 'w') or 3"},
                   "network_def::out_channels is the expression"),
    }  # fmt: skip
    for name, (network_def, expected) in cases.items():
        folder = write_bundle(tmp_path / name, network_def, dense_metadata(), state)
        text = refusal(lambda f=folder: load_bundle(f))
        assert expected in text and str(folder / INFERENCE) in text
    assert not (tmp_path / "pwned").exists()


def test_weights_that_are_not_weights_only_loadable_are_refused(tmp_path, unet_state):
    marker = tmp_path / "pwned"
    state = {**unet_state, "payload": Payload(marker)}
    folder = write_bundle(tmp_path / "evil", _unet_def(), unet_metadata(), state)
    text = refusal(ModelHandle.resolve(str(folder)).load)
    assert text.startswith(f"{folder / WEIGHTS}: refused: the checkpoint holds pickled")
    assert not marker.exists()
    nested = write_bundle(tmp_path / "nested", _unet_def(), unet_metadata(), {"state_dict": {}})
    assert "save that instead" in refusal(lambda: load_bundle(nested))


def test_a_foreign_bundle_is_not_changed_by_loading(unet_bundle):
    before = {p: p.read_bytes() for p in unet_bundle.rglob("*") if p.is_file()}
    ModelHandle.resolve(str(unet_bundle)).load()
    assert {p: p.read_bytes() for p in unet_bundle.rglob("*") if p.is_file()} == before


def test_metadata_that_contradicts_the_output_is_refused(tmp_path, unet_state):
    meta = unet_metadata()
    meta["network_data_format"]["outputs"]["pred"].update(type="probabilities", format="classes")
    folder = write_bundle(tmp_path / "a", _unet_def(), meta, unet_state)
    assert read_info(folder).kind == "classification"
    text = refusal(ModelHandle.resolve(str(folder)).load)
    assert "describes a classification output" in text and "(1, 3, 32, 32, 32)" in text


def test_a_monai_network_saved_by_hirescam3d_round_trips(tmp_path, unet_state):
    """save_bundle takes a MONAI network with its network_def (e.g. a segmentation demo)."""
    net = seeded(UNet, 3, **UNET_ARGS)
    spec = InputSpec(3, 1, (32, 32, 32), "SPL", (2.0, 2.0, 2.0), (-400.0, 200.0))
    info = ModelInfo(
        "seg", "a UNet", ("organ", "lesion", "other"), "model.2.0", spec,
        preprocessing_transforms(spec), "multilabel", True, False,
        kind="segmentation", patch=True,
    )  # fmt: skip
    folder = save_bundle(net, info, tmp_path / "seg", network_def={"_target_": "UNet", **UNET_ARGS})
    meta = json.loads((folder / METADATA).read_text())
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["type"] == "image" and pred["channel_def"] == {"0": "organ", "1": "lesion",
                                                               "2": "other"}  # fmt: skip
    loaded, got = ModelHandle.resolve(str(folder)).load()  # the declared guarantee is checked
    x = torch.rand(1, 1, 32, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), net(x))
    assert got.kind == "segmentation" and got.patch and got.activation == "sigmoid"
    assert got.bundle_format == "hirescam3d" and got.target_layer == "model.2.0"
    with pytest.raises(ModelError, match="network_def does not build the given network"):
        save_bundle(net, info, tmp_path / "bad", {"_target_": "UNet", **UNET_ARGS,
                                                  "channels": [4, 16]})  # fmt: skip


def test_a_malicious_bundle_through_the_installed_cli(tmp_path, unet_state):
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed")
    write_bundle(tmp_path / "evil", _unet_def(act="$__import__('os').system('touch pwned')"),
                 unet_metadata(), unet_state)  # fmt: skip
    result = subprocess.run(
        [str(script), "layers", "--model", "./evil"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and str(tmp_path / "evil") in lines[0]
    assert "network_def::act is the expression" in lines[0] and "--trust-bundle" in lines[0]
    assert not (tmp_path / "pwned").exists()
