"""A MONAI user's first hour (issue 27): the sliding-window warning, LayerError's
suggestions, ``layers`` taking what ``audit`` takes, readable tables, the ``trained``
field, the per-map no-evidence warning and ``save_bundle`` in one call."""

from __future__ import annotations

import json
import sys
import textwrap
import warnings

import pytest
import torch
from hirescam3d.cli import main as cli_main
from torch import nn
from typer.testing import CliRunner

pytestmark = pytest.mark.usefixtures("one_thread")
runner = CliRunner()


def invoke(*args: str, **env: str):
    return runner.invoke(cli_main.app, [str(a) for a in args], catch_exceptions=False, env=env)


# -- 1. the sliding-window warning ---------------------------------------------------------
def _unet(norm: str) -> nn.Module:
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    return UNet(3, 1, 2, (4, 8), (2,), norm=norm).eval()


def test_sliding_window_warns_once_for_window_statistics():
    from monai.inferers import sliding_window_inference

    from hirescam3d import Explainer

    x = torch.randn(1, 1, 32, 32, 32, generator=torch.Generator().manual_seed(0))
    box = torch.zeros(1, 1, 32, 32, 32, dtype=torch.bool)
    box[..., 12:20, 12:20, 12:20] = True
    for norm, expect in (("instance", True), ("batch", False)):
        net = _unet(norm)
        # the fact the warning states, checked with MONAI alone: windowed != whole volume
        # in the middle (instance norm), equal (batch norm in eval mode)
        with torch.no_grad():
            windowed = sliding_window_inference(x, 24, 4, net, overlap=0.5)
            middle = (slice(None), slice(None), *[slice(15, 17)] * 3)
            differs = not torch.allclose(windowed[middle], net(x)[middle], atol=1e-5)
        assert differs is expect
        explainer = Explainer(net, "model.1", class_names=["a", "b"])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                explainer.sliding_window(x, ["b"], region=box, roi_size=24, overlap=0.5)
        mine = [w for w in caught if "own statistics" in str(w.message)]
        assert len(mine) == (1 if expect else 0), [str(w.message) for w in caught]
        if expect:
            assert "InstanceNorm3d" in str(mine[0].message)


# -- 3. LayerError suggests the audit's certified layers first -----------------------------
def test_layer_error_suggests_certified_layers_first():
    from monai.networks.nets import SegResNet

    from hirescam3d.core.audit import audit_layer
    from hirescam3d.errors import LayerError
    from hirescam3d.models.handle import ModelHandle

    torch.manual_seed(0)
    net = SegResNet(3, 8, 1, 2).eval()
    shape = (1, 16, 16, 16)
    assert audit_layer(net, "act_mod", shape).guaranteed  # the oracle: computed directly
    handle = ModelHandle.from_network(net, ["bg", "organ"], shape)
    with pytest.raises(LayerError) as err:
        handle.check_layer("act")
    text = str(err.value)
    assert "Did you mean 'act_mod'" in text, text
    assert "HiResCAM is guaranteed at act_mod" in text
    assert "\n" not in text


# -- 4./5. layers takes what audit takes; tables a person can read -------------------------
USER_NET = textwrap.dedent(
    """
    from torch import nn

    def build():
        return nn.Sequential(
            nn.Conv3d(1, 4, 3, padding=1), nn.ReLU(),
            nn.Conv3d(4, 4, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(4, 3),
        )
    """
)


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "first_hour_net.py").write_text(USER_NET)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "first_hour_net:build"
    sys.modules.pop("first_hour_net", None)


def test_layers_accepts_module_callable_and_input_shape(user_module):
    from hirescam3d.core.audit import audit_model

    layers = invoke("layers", "--model", user_module, "--input-shape", "1x8x8x8", "--json")
    assert layers.exit_code == 0, layers.stderr
    rows = json.loads(layers.stdout)
    audit = invoke("audit", "--model", user_module, "--input-shape", "1x8x8x8", "--json")
    assert audit.exit_code == 0, audit.stderr
    # the same layers and verdicts as audit, and as the audit computed here directly
    audited = json.loads(audit.stdout)["layers"]
    assert [(r["name"], r["guaranteed"]) for r in rows] == [
        (r["layer"], r["guaranteed"]) for r in audited
    ]
    import first_hour_net

    direct = audit_model(first_hour_net.build().eval(), (1, 8, 8, 8))
    assert [(r["name"], r["guaranteed"]) for r in rows] == [
        (v.layer, v.guaranteed) for v in direct
    ]
    assert any(r["guaranteed"] for r in rows) and not all(r["guaranteed"] for r in rows)
    table = invoke("layers", "--model", user_module, "--input-shape", "1x8x8x8").stdout
    assert "(default)" in table
    missing = invoke("layers", "--model", user_module)
    assert missing.exit_code == 2 and "--input-shape" in missing.stderr


def test_audit_table_shows_certified_and_default_rows_unless_all():
    rows = json.loads(invoke("audit", "--model", "resnet18_cam_2d", "--json").stdout)["layers"]
    shown = [r for r in rows if r["guaranteed"] or r["default"]]
    assert 0 < len(shown) < len(rows)
    short = invoke("audit", "--model", "resnet18_cam_2d", COLUMNS="200").stdout
    every = invoke("audit", "--model", "resnet18_cam_2d", "--all", COLUMNS="200").stdout

    def listed(text: str) -> list[str]:
        names = {r["layer"] for r in rows}
        return [ln.split("│")[1].split()[0] for ln in text.splitlines()
                if ln.startswith("│") and ln.split("│")[1].split()
                and ln.split("│")[1].split()[0] in names]  # fmt: skip

    assert listed(short) == [r["layer"] for r in shown]
    assert f"and {len(rows) - len(shown)} other layer(s)" in short
    assert listed(every) == [r["layer"] for r in rows]
    assert "other layer(s)" not in every


def test_models_table_fits_80_columns_one_line_per_model():
    from hirescam3d.models import zoo

    text = invoke("models", COLUMNS="80").stdout
    lines = text.splitlines()
    assert max(len(ln.rstrip()) for ln in lines) <= 80
    for name in zoo.names():
        rows = [ln for ln in lines if ln.split() and ln.split()[0] == name]
        # one table row (name, trained, input, classes) and one description row
        assert len(rows) == 2, (name, rows)


# -- 6. reports that do not overstate ------------------------------------------------------
def test_trained_is_unknown_for_user_bundles_and_true_for_shipped_models(tmp_path):
    from monai.networks.nets import UNet

    from hirescam3d.models.bundle import save_bundle
    from hirescam3d.models.handle import ModelHandle

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (4, 8), (2,), norm="batch").eval()  # random weights
    folder = save_bundle(
        net, tmp_path / "random_unet",
        {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
         "channels": [4, 8], "strides": [2], "norm": "batch"},
        sample=torch.randn(1, 1, 16, 16, 16), class_names=["background", "organ"],
    )  # fmt: skip
    handle = ModelHandle.resolve(str(folder))
    assert handle.trained is None and handle.load()[1].trained is None
    assert ModelHandle.resolve("demo").trained is True  # shipped, measured weights
    assert ModelHandle.resolve("axialnet_tiny").trained is False


def test_report_json_trained_is_null_for_a_user_bundle(tmp_path):
    import nibabel as nib
    import numpy as np
    from monai.networks.nets import UNet

    from hirescam3d.models.bundle import save_bundle

    torch.manual_seed(0)
    net = UNet(3, 1, 2, (4, 8), (2,), norm="batch").eval()
    folder = save_bundle(
        net, tmp_path / "random_unet",
        {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 2,
         "channels": [4, 8], "strides": [2], "norm": "batch"},
        sample=torch.randn(1, 1, 16, 16, 16), class_names=["background", "organ"],
    )  # fmt: skip
    scan = tmp_path / "scan.nii.gz"
    rng = np.random.default_rng(0)
    nib.save(nib.Nifti1Image(rng.normal(size=(16, 16, 16)).astype(np.float32),
                             np.diag([-2.0, -2.0, 2.0, 1.0])), scan)  # fmt: skip
    result = invoke("explain", scan, "--model", folder, "--finding", "organ", "--out",
                    tmp_path / "out", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert "trained" in report["model"] and report["model"]["trained"] is None


def _blob():
    from tests.pipeline.test_pipeline import blob_model, oblique_phantom

    ct, organs, names, affine, _ = oblique_phantom()
    return blob_model(), ct, affine


def test_a_warning_per_map_without_positive_evidence(tmp_path):
    """BlobNet's "nothing" class has all-zero weights (no evidence); "blob" has some."""
    from hirescam3d.pipeline import explain_image, explain_scan

    model, ct, affine = _blob()
    result = explain_image(ct, affine, model=model, findings=["blob", "nothing"],
                           methods=["hirescam"], device="cpu")  # fmt: skip
    assert not result.maps[("nothing", "hirescam")].any()
    assert result.maps[("blob", "hirescam")].any()
    notes = [w for w in result.warnings if "no positive evidence" in w]
    assert notes == [
        "the map of nothing (hirescam) has no positive evidence (every cell is 0 or "
        "negative): it is all zeros"
    ]
    import nibabel as nib

    path = tmp_path / "chest.nii.gz"
    nib.save(nib.Nifti1Image(ct.astype("int16"), affine), path)
    scan, _ = explain_scan(path, tmp_path / "out", model=model, findings=["blob", "nothing"],
                           methods=["hirescam", "gradcam"], device="cpu")  # the CLI's path
    assert sorted(w for w in scan.warnings if "no positive evidence" in w) == [
        f"the map of nothing ({m}) has no positive evidence (every cell is 0 or negative): "
        "it is all zeros" for m in ("gradcam", "hirescam")
    ]


def test_napari_worker_warns_per_empty_map():
    pytest.importorskip("qtpy.QtWidgets", reason="the napari widget needs Qt")
    from hirescam3d.napari._widget import _explain

    model, ct, affine = _blob()
    result = _explain(ct, affine, "blobnet", ["blob", "nothing"], ["hirescam"], None, None,
                      None, lambda *a: None, {"blobnet": model})  # fmt: skip
    assert [w for w in result.warnings if "no positive evidence" in w] == [
        "the map of nothing (hirescam) has no positive evidence (every cell is 0 or "
        "negative): it is all zeros"
    ]


# -- 7. save_bundle in one call ------------------------------------------------------------
def _monai_reload(folder, sample):
    """The saved bundle as MONAI itself reads it: ConfigParser builds network_def, torch
    loads the weights (tensors only); the output on ``sample``."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(folder / "configs" / "inference.json")
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    with torch.no_grad():
        return network.eval()(sample)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["classifier", "unet"])
def test_save_bundle_infers_kind_classes_and_layer(tmp_path, kind):
    from monai.networks.nets import UNet, resnet10

    from hirescam3d.core.audit import audit_layer, audit_model
    from hirescam3d.models.bundle import save_bundle
    from hirescam3d.models.handle import ModelHandle

    torch.manual_seed(0)
    if kind == "classifier":
        net = resnet10(spatial_dims=3, n_input_channels=1, num_classes=3).eval()
        net_def = {"_target_": "resnet10", "spatial_dims": 3, "n_input_channels": 1,
                   "num_classes": 3}  # fmt: skip
        sample = torch.randn(1, 1, 32, 32, 32)
    else:
        net = UNet(3, 1, 3, (8, 16, 32), (2, 2), num_res_units=1).eval()
        net_def = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 3,
                   "channels": [8, 16, 32], "strides": [2, 2], "num_res_units": 1}  # fmt: skip
        sample = torch.randn(1, 1, 16, 16, 16)
    folder = save_bundle(net, tmp_path / kind, net_def, sample=sample)
    with torch.no_grad():
        expected = net(sample)
    torch.testing.assert_close(_monai_reload(folder, sample), expected)
    network, info = ModelHandle.resolve(str(folder)).load()
    torch.testing.assert_close(network(sample).detach(), expected)
    assert info.kind == ("classification" if kind == "classifier" else "segmentation")
    assert info.class_names == ("class_0", "class_1", "class_2")
    assert info.task == "multiclass" and info.input.spatial_size == tuple(sample.shape[2:])
    # the layer: one the audit certifies, computed here directly
    verdicts = audit_model(net, tuple(sample.shape[1:]))
    certified = {n for v in verdicts if v.guaranteed for n in (v.layer, *v.aliases)}
    assert info.target_layer in certified and info.guaranteed
    assert audit_layer(net, info.target_layer, tuple(sample.shape[1:])).guaranteed
