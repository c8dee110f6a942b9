"""MONAI bundles as they are published: the Model Zoo's configs (unchanged copies in
tests/fixtures/model_zoo) are read, resolved and explained; MONAI itself is the oracle.

- references, ids, macros and ``$`` expressions resolve to what MONAI's own
  ``ConfigParser`` resolves them to (trusted, in the test only);
- anything outside the evaluated subset, and every bad bundle, gets one line;
- the predicted masks and probabilities hirescam3d explains equal those of the bundle's
  own preprocessing, inferer and postprocessing run by MONAI, on phantoms written as
  NIfTI with an LPS-style affine (as from DICOM), with seeded random weights made from
  each config's ``network_def`` by MONAI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

from hirescam3d.data.phantom import make_chest_ct
from hirescam3d.errors import HiResCAMError, ModelError
from hirescam3d.io import scans as io
from hirescam3d.models.bundle import load_bundle, read_info
from hirescam3d.models.bundle_config import BundleConfig, trusted_get, trusted_parser
from hirescam3d.models.bundle_monai import resolve
from hirescam3d.models.handle import ModelHandle
from hirescam3d.pipeline import explain_arrays
from tests.conftest import installed_console_script

ZOO = Path(__file__).resolve().parents[1] / "fixtures" / "model_zoo"
PUBLISHED = ("spleen_ct_segmentation", "wholeBody_ct_segmentation", "segmentation_template",
             "classification_template")  # fmt: skip

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(call: Any, error: type[Exception] = ModelError) -> str:
    """The message of the error ``call()`` raises; it must be one line."""
    with pytest.raises(error) as err:
        call()
    text = str(err.value)
    assert "\n" not in text and text.strip() == text
    return text


def config_file(root: Path) -> Path:
    return next(p for p in sorted((root / "configs").glob("inference.*")))


def copy_bundle(name: str, dest: Path, seed: int = 0) -> tuple[Path, torch.nn.Module]:
    """The published configs of ``name`` with seeded random weights that MONAI builds from
    the config's own network_def, saved as MONAI's CheckpointSaver does."""
    root = dest / name
    shutil.copytree(ZOO / name, root)
    (root / "models").mkdir()
    parser = trusted_parser(config_file(root), root)
    torch.manual_seed(seed)
    network = parser.get_parsed_content("network_def")
    torch.save({"model": network.state_dict()}, root / "models" / "model.pt")
    return root, network.eval()


def lps_phantom(path: Path, shape: tuple[int, int, int], seed: int = 1) -> Path:
    """A phantom CT as NIfTI whose array axes run to L, P, S (as DICOM stores them)."""
    ct = make_chest_ct(seed, shape=shape)
    image = nib.Nifti1Image(ct.ct.astype(np.float32), ct.affine)
    ornt = nib.orientations.ornt_transform(
        nib.io_orientation(ct.affine), nib.orientations.axcodes2ornt(("L", "P", "S"))
    )
    image = image.as_reoriented(ornt)
    assert nib.aff2axcodes(image.affine) == ("L", "P", "S")
    nib.save(image, path)
    return path


def monai_prediction(root: Path, network: torch.nn.Module, scan: Path) -> dict[str, Any]:
    """The bundle's own pipeline, built and run by MONAI: preprocessing, inferer and
    postprocessing (SaveImaged left out). Returns the probabilities on the model grid and
    the labels on the scan's grid."""
    from monai.transforms import Compose, SaveImaged

    parser = trusted_parser(config_file(root), root)
    pre = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    post = [t for t in parser.get_parsed_content("postprocessing").transforms
            if not isinstance(t, SaveImaged)]  # fmt: skip
    data = pre({"image": str(scan)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    probabilities = post[0]({"pred": data["pred"].clone()})["pred"]  # Activationsd
    done = Compose(post)(data)["pred"]
    labels = done[0] if done.shape[0] == 1 else done.argmax(0)
    return {"probabilities": probabilities.as_tensor(), "labels": np.asarray(labels)}


# -- reading configs ----------------------------------------------------------------------
@pytest.mark.parametrize("name", PUBLISHED)
def test_published_configs_resolve_as_monai_resolves_them(name, tmp_path):
    root = ZOO / name
    resolve(root)  # once for the process's first imports (MONAI's lazy modules, yaml)
    start = time.perf_counter()
    ours = resolve(root)
    seconds = time.perf_counter() - start
    parser = trusted_parser(config_file(root), root)
    for key in ("network_def", "inferer"):
        assert getattr(ours, key) == trusted_get(parser, key, root)
    monai_pre = trusted_get(parser, "preprocessing", root)["transforms"]
    assert ours.preprocessing == monai_pre
    assert seconds <= 1.0, f"reading and resolving {name} took {seconds:.2f} s"
    info = read_info(root)  # no weights needed; class names from channel_def
    channel_def = json.loads((root / "configs" / "metadata.json").read_text())
    channels = channel_def["network_data_format"]["outputs"]["pred"]["channel_def"]
    assert list(info.class_names) == [channels[str(i)] for i in range(len(channels))]
    assert info.activation == "softmax"  # each postprocessing has Activationsd(softmax)


EXPRESSIONS = {
    "root_path": "$@bundle_root + '/models/model.pt'",
    "n_axes": "$len(@spatial_size)",
    "image": "$monai.utils.CommonKeys.IMAGE",
    "dtype": "$numpy.float32",
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "arithmetic": "$(@spatial_size[0] * 2 - 1) // 3 + 2 ** 3 % 5",
    "subscript": "$@spatial_size[1:]",
    "nested": "@params::inner#depth",
    "listed": "@transforms::1::pixdim",
    "pick": "$[1.5, 1.5, 1.5] if @params#highres else [3.0, 3.0, 3.0]",
    "compare": "$@spatial_size[0] >= 96 and not @params::highres",
    "macro_same": "%#params::inner",
}


def test_expressions_references_and_macros_resolve_as_monai_resolves_them(tmp_path):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    config = {
        "spatial_size": [96, 64, 32],
        "params": {"highres": False, "inner": {"depth": 3}},
        "transforms": [{"_target_": "EnsureTyped", "keys": "image"},
                       {"_target_": "Spacingd", "keys": "image", "pixdim": "$[2.0] * 3"}],
        "from_file": "%configs/common.json#shared::value",
        **EXPRESSIONS,
    }  # fmt: skip
    (root / "configs" / "common.json").write_text(json.dumps({"shared": {"value": [1, 2]}}))
    path = root / "configs" / "inference.json"
    path.write_text(json.dumps(config))
    ours = BundleConfig.read(root)
    parser = trusted_parser(path, root)
    cwd = os.getcwd()
    os.chdir(root)  # MONAI reads macro files relative to the working directory
    try:
        for key in [*EXPRESSIONS, "from_file", "transforms"]:
            expected = trusted_get(parser, key, path)
            assert ours.get(key) == expected, key
    finally:
        os.chdir(cwd)
    assert ours.get("root_path") == f"{root.resolve()}/models/model.pt"


REFUSED = {
    "$__import__('os').system('touch pwned')": "names with '__' are not allowed",
    "$open('pwned', 'w')": "the name 'open' is not allowed",
    "$os.system('touch pwned')": "the name 'os' is not allowed",
    "$torch.load('pwned')": "calling 'load' is not allowed",
    "$[open('pwned', 'w') for i in range(1)]": "ListComp expressions are not evaluated",
    "$lambda x: x": "Lambda expressions are not evaluated",
    "$torch.os.system('touch pwned')": "outside monai, numpy and torch",
    "$torch.save": "it evaluates to a function",
    "$'a' * 10 ** 9": "too long",
    "$import os": "not a Python expression",
    "$sorted(['pwned'], key=numpy.loadtxt)": "functions may not be passed as arguments",
    "$max([0], key=torch.load)": "functions may not be passed as arguments",
    "$((10 ** 64) ** 64) ** 64": "the number is too large",
}


@pytest.mark.parametrize("expression", list(REFUSED))
def test_expressions_outside_the_subset_are_refused_in_one_line(tmp_path, expression):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    path = root / "configs" / "inference.json"
    path.write_text(json.dumps({"network_def": {"_target_": "UNet", "channels": expression}}))
    text = one_line(lambda: BundleConfig.read(root).get("network_def"))
    assert text.startswith(f"{path}: network_def::channels is the expression {expression!r}")
    assert REFUSED[expression] in text and "--trust-bundle" in text
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


def test_missing_and_circular_references_are_refused_in_one_line(tmp_path):
    root = tmp_path / "bundle"
    (root / "configs").mkdir(parents=True)
    path = root / "configs" / "inference.yaml"
    path.write_text("a: '@b'\nb: '$@c + 1'\nc: '@a'\nd: '@nothing::here'\n")
    cfg = BundleConfig.read(root)
    assert one_line(lambda: cfg.get("a")) == f"{path}: circular reference: a -> b -> c -> a"
    text = one_line(lambda: cfg.get("d"))
    assert text == f"{path}: d refers to '@nothing::here', which the config does not define"


def test_entries_explaining_does_not_need_are_never_evaluated(tmp_path):
    root, _ = copy_bundle("segmentation_template", tmp_path)
    marker = tmp_path / "pwned"
    parser_yaml = (root / "configs" / "inference.yaml").read_text()
    poison = f"$open({str(marker)!r}, 'w').close()"
    extra = {"dataset": {"_target_": "Dataset", "data": poison}, "handlers": [poison],
             "evaluator": poison, "datalist": poison}  # fmt: skip
    mine = root / "configs" / "mine.yaml"
    import yaml

    config = yaml.safe_load(parser_yaml)
    config.update(extra)
    config["postprocessing"]["transforms"][-1]["output_dir"] = poison  # SaveImaged
    mine.write_text(yaml.safe_dump(config))
    handle = ModelHandle.resolve(str(root), config="mine")
    assert handle.class_names[1] == "category 1" and handle.kind == "segmentation"
    network, info = load_bundle(root, config="mine")  # network and weights (no audit)
    assert info.inferer == {"kind": "simple"} and not marker.exists()
    assert isinstance(network, torch.nn.Module) and not network.training
    text = one_line(lambda: ModelHandle.resolve(str(root), config="other").info)
    assert "no config 'other'" in text and "inference.yaml" in text and "mine.yaml" in text


# -- bad bundles --------------------------------------------------------------------------
def _bundle(tmp_path: Path, network_def: Any, state: Any = None, name: str = "b") -> Path:
    root = tmp_path / name
    shutil.copytree(ZOO / "segmentation_template" / "configs", root / "configs")
    (root / "models").mkdir()
    path = root / "configs" / "inference.yaml"
    import yaml

    config = yaml.safe_load(path.read_text())
    if network_def is None:
        del config["network_def"]
    else:
        config["network_def"] = network_def
    path.write_text(yaml.safe_dump(config))
    if state is not None:
        torch.save(state, root / "models" / "model.pt")
    return root


def test_bad_bundles_are_refused_in_one_line(tmp_path):
    unet = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
            "channels": [4, 8], "strides": [2], "num_res_units": 1}  # fmt: skip
    from monai.networks.nets import UNet

    torch.manual_seed(0)
    state = UNet(**{k: v for k, v in unet.items() if k != "_target_"}).state_dict()
    config = tmp_path / "{}" / "configs" / "inference.yaml"

    root = _bundle(tmp_path, None, state, "no_net")
    text = one_line(lambda: read_info(root))
    assert text.startswith(f"{config.as_posix().format('no_net')}: no network_def")

    wrong = dict(state)
    first = next(iter(wrong))
    wrong[first + "_renamed"] = wrong.pop(first)
    root = _bundle(tmp_path, unet, wrong, "mismatch")
    text = one_line(lambda: load_bundle(root))
    assert f"first differing key {first!r}" in text

    root = _bundle(tmp_path, unet, None, "torchscript")
    torch.jit.save(torch.jit.script(UNet(**{k: v for k, v in unet.items() if k != "_target_"})),
                   root / "models" / "model.ts")  # fmt: skip
    text = one_line(lambda: load_bundle(root))
    assert "only TorchScript weights" in text and "give models/model.pt" in text

    conv = {"_target_": "torch.nn.Conv3d", "in_channels": 1, "out_channels": 4,
            "kernel_size": 3, "padding": 1}  # fmt: skip
    torch.manual_seed(0)
    conv_state = torch.nn.Conv3d(1, 4, 3, padding=1).state_dict()
    root = _bundle(tmp_path, conv, {"model": conv_state}, "foreign")
    text = one_line(lambda: load_bundle(root))
    assert "refusing to build _target_ 'torch.nn.Conv3d'" in text and "--trust-bundle" in text
    with pytest.warns(UserWarning, match="same trust as `python -m monai.bundle run`"):
        handle = ModelHandle.resolve(str(root), trust=True)
    network, _ = load_bundle(root, trust=True)  # MONAI builds it; weights stay tensors only
    assert isinstance(network, torch.nn.Conv3d) and handle.bundle_options == {"trust": True}
    assert torch.equal(network.weight, conv_state["weight"])


def test_files_stay_inside_the_bundle_unless_trusted(tmp_path):
    unet = {"_target_": "UNet", "spatial_dims": 3, "in_channels": 1, "out_channels": 4,
            "channels": [4, 8], "strides": [2], "num_res_units": 1}  # fmt: skip
    from monai.networks.nets import UNet

    state = UNet(**{k: v for k, v in unet.items() if k != "_target_"}).state_dict()
    outside = tmp_path / "elsewhere.pt"
    torch.save(state, outside)
    root = _bundle(tmp_path, unet, None, "linked")
    weights = root / "models" / "model.pt"
    weights.symlink_to(outside)
    text = one_line(lambda: load_bundle(root))
    assert text.startswith(f"{weights}: refused: the weights file (a symbolic link) points "
                           "outside the bundle folder")  # fmt: skip
    load_bundle(root, trust=True)  # trusted: followed
    weights.unlink()
    weights.symlink_to("/dev/zero")
    text = one_line(lambda: load_bundle(root, trust=True))
    assert "not a regular file" in text and "missing" not in text
    weights.unlink()
    weights.symlink_to(tmp_path / "gone.pt")
    text = one_line(lambda: load_bundle(root, trust=True))
    assert "gone.pt, which is missing" in text
    # a config and a macro target outside the bundle
    (tmp_path / "evil.yaml").write_text("network_def: {_target_: UNet}\n")
    config = root / "configs" / "linked.yaml"
    config.symlink_to(tmp_path / "evil.yaml")
    text = one_line(lambda: read_info(root, config="linked.yaml"))
    assert "the config file (a symbolic link) points outside the bundle folder" in text
    macro = root / "configs" / "macro.yaml"
    macro.write_text(f"network_def: '%{tmp_path / 'evil.yaml'}#network_def'\n")
    text = one_line(lambda: read_info(root, config="macro"))
    assert "the macro file" in text and "points outside the bundle folder" in text
    meta = root / "configs" / "metadata.json"
    (tmp_path / "metadata.json").write_bytes(meta.read_bytes())
    meta.unlink()
    meta.symlink_to("/dev/zero")
    text = one_line(lambda: ModelHandle.resolve(str(root)).class_names)
    assert "points outside the bundle folder" in text and "missing" not in text
    meta.unlink()
    meta.symlink_to(tmp_path / "metadata.json")
    assert "(a symbolic link) points outside" in one_line(lambda: read_info(root))


# -- the same prediction as MONAI's own pipeline ------------------------------------------
@pytest.fixture(scope="module")
def spleen(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("spleen")
    root, network = copy_bundle("spleen_ct_segmentation", tmp)
    scan = lps_phantom(tmp / "scan.nii.gz", (24, 32, 32))
    return {"root": root, "network": network, "scan": scan}


@pytest.mark.slow
def test_spleen_prediction_equals_monais_own_pipeline(spleen):
    root, scan_path = spleen["root"], spleen["scan"]
    handle = ModelHandle.resolve(str(root))
    info = handle.info
    assert info.inferer["kind"] == "sliding" and info.inferer["roi_size"] == [96, 96, 96]
    assert info.inferer["overlap"] == 0.5 and info.inferer["sw_batch_size"] == 4
    scan = io.read_scan(scan_path)
    explanation = explain_arrays(scan.array, scan.affine, model=handle)
    oracle = monai_prediction(root, spleen["network"], scan_path)
    probabilities = oracle["probabilities"]
    predicted = probabilities.argmax(0)
    assert set(explanation.masks) == {n for k, n in enumerate(handle.class_names)
                                      if bool((predicted == k).any())}  # fmt: skip
    for k, name in enumerate(handle.class_names):
        mask = predicted == k
        # the explained masks are the bundle's own prediction on the model's grid ...
        assert torch.equal(explanation.masks[name], mask)
        assert explanation.probabilities[name] == pytest.approx(
            float(probabilities[k][mask].mean()), rel=1e-5
        )
        # ... and on the scan's grid (the bundle's own Invertd of the probabilities, then
        # argmax), voxel for voxel
        np.testing.assert_array_equal(explanation.mask_on_scan(name).astype(bool),
                                      oracle["labels"] == k)  # fmt: skip
    report = explanation.to_dict()["region"]["sliding_window"]
    assert report["mode"] == "constant" and report["overlap"] == 0.5


@pytest.mark.slow
def test_segmentation_template_yaml_prediction_equals_monais(tmp_path):
    root, network = copy_bundle("segmentation_template", tmp_path)
    scan_path = lps_phantom(tmp_path / "scan.nii.gz", (16, 32, 32))
    handle = ModelHandle.resolve(str(root))
    assert handle.info.preprocessing[-1]["_target_"] == "ScaleIntensityd"
    scan = io.read_scan(scan_path)
    explanation = explain_arrays(scan.array, scan.affine, model=handle)
    oracle = monai_prediction(root, network, scan_path)
    for k, name in enumerate(handle.class_names):
        if name in explanation.masks:
            assert torch.equal(explanation.masks[name], oracle["probabilities"].argmax(0) == k)
            # no spatial transform: the scan grid is the model grid
            np.testing.assert_array_equal(explanation.mask_on_scan(name).astype(bool),
                                          oracle["labels"] == k)  # fmt: skip


def test_a_2d_bundle_given_a_3d_scan_is_refused_in_one_line(tmp_path):
    root, _ = copy_bundle("classification_template", tmp_path)
    handle = ModelHandle.resolve(str(root))
    assert handle.kind == "classification" and handle.input.spatial_dims == 2
    assert handle.class_names == ("background", "circle", "triangle", "rectangle")
    volume = np.zeros((8, 16, 16), np.float32)
    text = one_line(lambda: explain_arrays(volume, np.eye(4), model=handle), HiResCAMError)
    assert "is a 2D model" in text and "give it a 2D image" in text


# -- front ends ---------------------------------------------------------------------------
def test_the_cli_reads_a_published_bundle(tmp_path):
    script = installed_console_script()
    if script is None:
        pytest.skip("the hirescam3d console script is not installed")
    root, _ = copy_bundle("spleen_ct_segmentation", tmp_path)
    result = subprocess.run([str(script), "findings", "--model", str(root)],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr
    meta = json.loads((root / "configs" / "metadata.json").read_text())
    assert result.stdout.splitlines() == [f"# {meta['name']} {meta['version']}", "background",
                                          "spleen"]  # fmt: skip
    result = subprocess.run(
        [str(script), "findings", "--model", str(root), "--config", "inference_trt",
         "--trust-bundle"], capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "same trust as `python -m monai.bundle run`" in result.stderr
