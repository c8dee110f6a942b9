"""ModelHandle: one rule for names and paths, findings and layers checked in one place,
weights loaded once, and a bundle's declared guarantee checked against the audit."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from torch import nn

from hirescam3d.errors import LayerError, ModelError, TargetError
from hirescam3d.models import zoo
from hirescam3d.models.bundle import (
    METADATA,
    InputSpec,
    ModelInfo,
    preprocessing_transforms,
    save_bundle,
)
from hirescam3d.models.handle import ModelHandle, ModelNotFoundError, finding_key, match_findings
from hirescam3d.models.nets import VOC_CLASSES, CAMNet
from hirescam3d.pipeline import check_findings
from tests.conftest import installed_console_script

REPO = Path(__file__).resolve().parents[2]
PHOTO64 = InputSpec(2, 3, (64, 64), None, None, (0.0, 255.0), "photograph", "resize")


def cam_bundle(folder: Path, layer: str, guaranteed: bool) -> Path:
    """A small 2D CAM-architecture bundle whose metadata declares ``guaranteed`` at ``layer``."""
    torch.manual_seed(0)
    net = CAMNet(["cat", "dog"], "resnet18", spatial_dims=2, in_channels=3).eval()
    info = ModelInfo(
        name="small_cam",
        description="a small CAM network for tests",
        class_names=net.class_names,
        target_layer=layer,
        input=PHOTO64,
        preprocessing=preprocessing_transforms(PHOTO64),
        task="multilabel",
        guaranteed=guaranteed,
        trained=False,
    )
    return save_bundle(net, info, folder)


# -- name vs path -------------------------------------------------------------------------
def test_zoo_names_resolve_without_weights_and_match_the_zoo():
    for name in zoo.names():
        handle = ModelHandle.resolve(name)
        card = zoo.entry(name).info
        assert handle.source == "zoo" and handle.name == name and not handle.loaded
        assert handle.class_names == card.class_names
        assert handle.default_layer == card.target_layer
        assert handle.input == card.input and handle.task == "multilabel"
        assert handle.declared_guaranteed is True
    assert ModelHandle.resolve("resnet34v").class_names == VOC_CLASSES
    assert ModelHandle.resolve(None).name == "demo"
    demo = ModelHandle.resolve("demo")
    assert demo.trained and demo.bundle_path == zoo.DEMO_BUNDLE
    assert ModelHandle.resolve("axialnet_tiny").trained is False


def test_audit_input_shape_is_shortened_only_for_axialnet():
    assert ModelHandle.resolve("axialnet").input_shape == (1, 405, 420, 420)
    assert ModelHandle.resolve("axialnet").audit_input_shape == (1, 6, 420, 420)
    assert ModelHandle.resolve("demo").audit_input_shape == (1, 6, 128, 128)
    assert ModelHandle.resolve("resnet18_cam_3d").audit_input_shape == (1, 96, 128, 128)
    assert ModelHandle.resolve("resnet34v").audit_input_shape == (3, 224, 224)


def test_zoo_names_win_over_folders_and_paths_are_folders(tmp_path, monkeypatch):
    cam_bundle(tmp_path / "axialnet_tiny", "features.layer4", True)
    monkeypatch.chdir(tmp_path)
    assert ModelHandle.resolve("axialnet_tiny").source == "zoo"
    folder = ModelHandle.resolve("./axialnet_tiny")
    assert folder.source == "bundle" and folder.bundle_path == (tmp_path / "axialnet_tiny")
    assert folder.class_names == ("cat", "dog") and folder.name == "small_cam"
    assert ModelHandle.resolve(Path("axialnet_tiny")).source == "bundle"
    (tmp_path / "my_model").mkdir()
    with pytest.raises(ModelNotFoundError, match="^my_model: not a model bundle"):
        ModelHandle.resolve("my_model")  # an existing folder: a path, not a zoo name


def test_unknown_names_and_bad_paths_have_distinct_messages(tmp_path):
    valid = ", ".join(zoo.names())
    with pytest.raises(ModelNotFoundError) as err:
        ModelHandle.resolve("axialnet_tiyn")
    text = str(err.value)
    assert text.startswith("unknown model 'axialnet_tiyn'. Did you mean 'axialnet_tiny'")
    assert valid in text and text.endswith("or pass a bundle folder")
    with pytest.raises(ModelNotFoundError) as err:
        ModelHandle.resolve(str(tmp_path / "nowhere"))
    assert "nowhere: not a model bundle (no such bundle folder)" in str(err.value)
    (tmp_path / "model.pt").write_bytes(b"")
    with pytest.raises(ModelNotFoundError) as err:
        ModelHandle.resolve(str(tmp_path / "model.pt"))
    assert "model.pt: is a file, not a model bundle" in str(err.value) and valid in str(err.value)
    with pytest.raises(ModelNotFoundError, match=r"no configs/metadata\.json in it"):
        ModelHandle.resolve(str(tmp_path))
    assert issubclass(ModelNotFoundError, ModelError)


# -- findings -----------------------------------------------------------------------------
def test_findings_match_case_insensitively_with_spaces_as_underscores():
    demo = ModelHandle.resolve("demo")
    assert finding_key("  Pleural   Effusion ") == "pleural_effusion"
    assert demo.check_findings(["Pleural Effusion"]) == ["pleural_effusion"]
    assert demo.check_findings(
        ["Atelectasis", "ATELECTASIS", "nodule", "Pericardial effusion"]
    ) == [
        "atelectasis",
        "nodule",
        "pericardial_effusion",
    ]
    # The pipeline's check is the same function; None means "decide by probability".
    assert check_findings(["Cardiomegaly"], zoo.CHEST_FINDINGS) == ["cardiomegaly"]
    assert check_findings(None, zoo.CHEST_FINDINGS) is None
    with pytest.raises(TargetError, match="no finding given"):
        check_findings([], zoo.CHEST_FINDINGS)
    # Class names spelled with capitals and spaces are matched the same way.
    assert match_findings(["pleural_effusion"], ["Pleural Effusion", "Nodule"]) == [
        "Pleural Effusion"
    ]
    assert match_findings(["a", "A"], ["a", "A"]) == ["a", "A"]  # exact spelling wins


def test_unknown_findings_name_the_valid_ones_and_close_matches():
    demo = ModelHandle.resolve("demo")
    with pytest.raises(TargetError) as err:
        demo.check_findings(["Atelectsis"])
    text = str(err.value)
    assert text.startswith("unknown finding 'Atelectsis'. Did you mean 'atelectasis'?")
    assert text.endswith("Valid findings: " + ", ".join(zoo.CHEST_FINDINGS))
    with pytest.raises(TargetError) as err:
        demo.check_findings(["nodul", "pneumonia", "nodule"])
    text = str(err.value)
    assert text.startswith(
        "unknown findings 'nodul', 'pneumonia'. Did you mean 'nodule' for 'nodul'?"
    )


# -- loading, layers, audit ---------------------------------------------------------------
def test_load_is_cached_and_pairs_find_their_handle():
    handle = ModelHandle.resolve("axialnet_tiny")
    network, info = handle.load()
    assert handle.load()[0] is network and handle.network is network
    assert not network.training and info.name == "axialnet_tiny" and info.trained is False
    assert ModelHandle.of(network, info) is handle
    assert ModelHandle.resolve((network, info)) is handle
    verdict = handle.audit()
    assert verdict.layer == "to_volume" and verdict.default and verdict.guaranteed
    assert ModelHandle.of(network, info).guaranteed("to_volume") is True
    assert handle.audit("to_volume") is verdict  # the pipeline reused the cached verdict


def test_check_layer_lists_candidates_and_refuses_unusable_layers():
    handle = ModelHandle.resolve("axialnet_tiny")
    assert handle.check_layer(None) == "to_volume"
    assert handle.check_layer("fc") == "fc"
    with pytest.raises(LayerError) as err:
        handle.check_layer("to_volumes")
    text = str(err.value)
    assert text.startswith("unknown layer 'to_volumes'. Did you mean 'to_volume'?")
    assert "Candidate layers of axialnet_tiny: to_volume, fc" in text
    with pytest.raises(LayerError, match="reduce.relu4"):
        handle.check_layer("reduce.relu4")  # per-triplet layout: explain cannot use it
    assert [v.layer for v in handle.layers()] == ["to_volume", "fc"]


def test_a_user_network_gets_a_computed_guarantee():
    net = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1), nn.Flatten(), nn.Linear(64, 2)
    ).eval()
    handle = ModelHandle.from_network(net, ["yes", "no"], input_shape=(1, 4, 4), default_layer="0")
    assert handle.source == "network" and handle.class_names == ("yes", "no")
    assert handle.input_shape == (1, 4, 4) and handle.declared_guaranteed is None
    _, info = handle.load()
    assert info.guaranteed is False and info.target_layer == "0"
    assert handle.audit("0").first_nonlinear == "relu"
    assert handle.audit("2").guaranteed is True
    # A declared flag that lies does not reach the report: the pipeline computes it.
    lying = ModelInfo(
        "x", "", ("yes", "no"), "0", InputSpec(2, 1, (4, 4)), [], "multilabel", True, True
    )
    fresh = nn.Sequential(*net)  # same modules, new container: a network with no handle yet
    assert ModelHandle.of(fresh, lying).guaranteed("0") is False
    assert ModelHandle.of(fresh, lying).guaranteed("2") is True
    with pytest.raises(ModelError, match="pass class_names"):
        ModelHandle.from_network(nn.Linear(2, 2))


def test_a_bundle_declaring_a_false_guarantee_is_refused(tmp_path):
    honest = cam_bundle(tmp_path / "honest", "features.layer3", False)
    network, info = ModelHandle.resolve(str(honest)).load()
    assert info.guaranteed is False and info.target_layer == "features.layer3"

    lying = cam_bundle(tmp_path / "lying", "features.layer3", True)
    handle = ModelHandle.resolve(str(lying))
    assert handle.class_names == ("cat", "dog") and handle.declared_guaranteed is True
    with pytest.raises(ModelError) as err:
        handle.load()
    text = str(err.value)
    assert text.startswith(f"{lying.resolve()}: refused: its metadata declares HiResCAM")
    assert "guaranteed faithful at 'features.layer3'" in text and "relu" in text
    assert not handle.loaded

    # The other way round: a guaranteed layer declared as not guaranteed is also wrong.
    modest = cam_bundle(tmp_path / "modest", "features.layer4", False)
    with pytest.raises(ModelError, match="declares HiResCAM not guaranteed at 'features.layer4'"):
        zoo.load(modest)
    meta = json.loads((modest / METADATA).read_text())
    meta["hirescam3d"]["guaranteed"] = True
    (modest / METADATA).write_text(json.dumps(meta))
    assert zoo.load(modest)[1].guaranteed is True


def test_a_lying_bundle_through_the_installed_cli(tmp_path):
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed")
    lying = cam_bundle(tmp_path / "lying", "features.layer3", True)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(script), *args], capture_output=True, text=True, timeout=300, cwd=tmp_path
        )

    result = run("layers", "--model", str(lying))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "refused" in lines[0]
    assert str(lying.resolve()) in lines[0] and "Traceback" not in result.stderr
    result = run("findings", "--model", "./lying")  # metadata only: still listed
    assert result.returncode == 0 and result.stdout.split() == ["cat", "dog"]
    result = run("findings", "--model", "./lying", "--json")
    assert json.loads(result.stdout) == ["cat", "dog"]


