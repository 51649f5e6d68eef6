"""CLI flags that change what a command computes, each checked against an independent
computation or the Python API's answer (not just "it ran"):

convert --eps / --include / --exclude / --calib-images / --calib-train, export --opset,
verify --images / --rtol / --seed, predict --img-size, compare --limit / --img-size,
inspect of a timm model name, train --help-recipe and train's missing arguments.

Small models only (mobilenetv3_small_050 from a seeded local checkpoint; resnet10t and rexnet_100
with --no-pretrained) and tiny PIL image folders; the expensive outputs are made once per module.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import shutil

import pytest
import timm
import torch
from _cli import invoke, ok, one_error
from _data import make_folder
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.utils import parametrize
from typer.testing import CliRunner
from wsurgery.cli._common import DEBUG_ENV, console
from wsurgery.cli.main import app

import wsurgery

NUM_CLASSES = 3
#: the shared model: tiny (a few MFLOPs), BatchNorm after every conv but the head, SE convs with biases
MODEL = "mobilenetv3_small_050"
STEM = "conv_stem"


# ---------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _offline_no_debug_wide(monkeypatch):
    monkeypatch.delenv(DEBUG_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # a wide console: one table row per line, so cells (long tmp paths included) can be read back
    monkeypatch.setattr(console, "width", 400)



def table_rows(stdout: str) -> list[list[str]]:
    """The body rows of every rich table printed (cells stripped), one list per line."""
    return [[c.strip() for c in line.strip()[1:-1].split("│")]
            for line in stdout.splitlines() if line.strip().startswith("│")]


def kv(stdout: str) -> dict[str, str]:
    """A ``kv_table``'s rows as a dict."""
    return {r[0]: r[1] for r in table_rows(stdout) if len(r) == 2}


def conv_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def standardized_names(model: nn.Module) -> set[str]:
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and parametrize.is_parametrized(m, "weight")}


# ---------------------------------------------------------------------------- shared fixtures


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread for this module (restored after): on 2 busy cores, 2 threads made each small
    forward pass up to 50x slower (OpenMP threads waiting on each other), 1 thread does not."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A seeded MODEL checkpoint (3 classes), 9 small images, its adaptive-WS conversion and its export.

    Adaptive WS keeps the random model's function (plain WS with BatchNorm kept does not: with random
    weights its logits reach 1e19), so predictions, verify and compare see ordinary numbers.
    """
    root = tmp_path_factory.mktemp("flags")
    torch.manual_seed(0)
    original = timm.create_model(MODEL, pretrained=False, num_classes=NUM_CLASSES).eval()
    ckpt = root / "model.safetensors"
    save_file(original.state_dict(), str(ckpt))
    images = make_folder(root / "images", per_class=3, size=32, seed=0)
    num_images = len(list(images.rglob("*.png")))
    runs, export = root / "aws", root / "export"
    ok(invoke("convert", MODEL, "--checkpoint", ckpt, "--num-classes", NUM_CLASSES, "--mode", "aws", "-o", runs))
    ok(invoke("export", runs, "-o", export))
    return {"root": root, "ckpt": ckpt, "state": load_file(str(ckpt)), "convs": conv_names(original),
            "images": images, "num_images": num_images, "runs": runs, "export": export}


@pytest.fixture(scope="module")
def gn_runs(base):
    """The same checkpoint converted with BN -> GN (a model that computes something else)."""
    out = base["root"] / "ws-gn"
    ok(invoke("convert", MODEL, "--checkpoint", base["ckpt"], "--num-classes", NUM_CLASSES, "--norm", "gn", "-o", out))
    return out


@pytest.fixture(scope="module")
def perturbed(base):
    """A copy of the export with one conv weight nudged (seeded), so verify has something to find."""
    out = base["root"] / "perturbed"
    out.mkdir()
    shutil.copy(base["export"] / "config.json", out / "config.json")
    weights = base["export"] / "model.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        metadata = f.metadata()
        names = list(f.keys())
        tensors = {k: f.get_tensor(k) for k in names}
    w = tensors[f"{STEM}.weight"]
    gen = torch.Generator().manual_seed(0)
    tensors[f"{STEM}.weight"] = w + 1e-2 * w.abs().max() * torch.randn(w.shape, generator=gen)
    save_file(tensors, str(out / "model.safetensors"), metadata=metadata)
    return out


# ---------------------------------------------------------------------------- convert


def _reference_ws(w: torch.Tensor, convention: str, eps: float) -> torch.Tensor:
    """(W - mean) / scale per output filter, in float64, written out from the README's table."""
    w = w.double()
    flat_w = w.reshape(w.shape[0], -1)
    mean = flat_w.mean(dim=1, keepdim=True)
    var = flat_w.var(dim=1, unbiased=False, keepdim=True)
    scale = torch.sqrt(var + eps) if convention == "timm" else torch.sqrt(var) + eps
    return ((flat_w - mean) / scale).reshape(w.shape)


@pytest.mark.parametrize("convention", ["timm", "seed"])
def test_convert_eps_is_recorded_and_used(base, tmp_path, convention):
    eps = 0.5
    out = tmp_path / convention
    # the default convention (timm) is used without --convention
    flags = [] if convention == "timm" else ["--convention", convention]
    ok(invoke("convert", MODEL, "--checkpoint", base["ckpt"], "--num-classes", NUM_CLASSES, *flags,
              "--eps", eps, "-o", out))
    config = json.loads((out / "config.json").read_text())
    assert config["wsurgery"]["surgery"]["eps"] == eps
    assert config["wsurgery"]["surgery"]["convention"] == convention
    model = wsurgery.load(out)
    assert model.wsurgery_config.ws_convention.eps == eps
    names = conv_names(model)
    assert names == base["convs"] and standardized_names(model) == set(names)
    default_eps = {"timm": 1e-6, "seed": 1e-5}[convention]
    for name in names:
        w = base["state"][f"{name}.weight"]
        with torch.no_grad():
            got = model.get_submodule(name).weight.double()  # the parametrized (standardized) weight
        expected = _reference_ws(w, convention, eps)
        assert torch.allclose(got, expected, rtol=1e-4, atol=1e-5), name
        # the eps really matters at this size: the convention's own eps gives a different weight
        assert not torch.allclose(got, _reference_ws(w, convention, default_eps), rtol=1e-2, atol=1e-3), name
    # and the forward pass uses it: the stem computes F.conv2d with the expected weight
    conv = model.get_submodule(STEM)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = conv(x)
        y_ref = nn.functional.conv2d(x.double(), _reference_ws(base["state"][f"{STEM}.weight"], convention, eps),
                                     None, conv.stride, conv.padding, conv.dilation, conv.groups)
    assert torch.allclose(y.double(), y_ref, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def rexnet_convs():
    """rexnet_100 has features.1 and features.10 ... features.16: a naive prefix match would mix them."""
    names = conv_names(timm.create_model("rexnet_100", pretrained=False))
    assert any(n.startswith("features.1.") for n in names) and any(n.startswith("features.10.") for n in names)
    return names


@pytest.mark.parametrize(
    "include,exclude",
    [
        (["features.1.*", "stem.*"], []),          # repeatable include; must not take features.10 ...
        ([], ["features.1.*"]),                   # exclude only features.1, keep features.10 ...
        (["features.1*"], ["features.1.*"]),       # both: include the prefix, exclude wins for features.1
    ],
)
def test_convert_include_exclude_use_fnmatch_on_module_names(tmp_path, rexnet_convs, include, exclude):
    def selected(name: str) -> bool:
        if include and not any(fnmatch.fnmatchcase(name, p) for p in include):
            return False
        return not any(fnmatch.fnmatchcase(name, p) for p in exclude)

    expected = {n for n in rexnet_convs if selected(n)}
    assert 0 < len(expected) < len(rexnet_convs)
    args = [a for p in include for a in ("--include", p)] + [a for p in exclude for a in ("--exclude", p)]
    out = tmp_path / "rex"
    ok(invoke("convert", "rexnet_100", "--no-pretrained", *args, "-o", out))
    model = wsurgery.load(out)
    assert standardized_names(model) == expected
    assert set(conv_names(model)) == set(rexnet_convs)  # the others are still there, as plain convs
    cfg = model.wsurgery_config
    assert (cfg.include, cfg.exclude) == (include, exclude)
    config = json.loads((out / "config.json").read_text())
    assert {c["name"] for c in config["wsurgery"]["report"]["changes"]} == expected


@pytest.fixture(scope="module")
def calibrated(base):
    """Two distill-only calibrations of WS + GN: --calib-train affine on 8 images, all on every image."""
    common = ["convert", MODEL, "--checkpoint", base["ckpt"], "--num-classes", NUM_CLASSES, "--norm", "gn",
              "--calibrate", "distill", "--calib-data", base["images"], "--calib-steps", "3", "--calib-batch", "4",
              "--calib-size", "64", "--calib-lr", "0.01", "--seed", "0"]
    affine, everything = base["root"] / "cal-affine", base["root"] / "cal-all"
    ok(invoke(*common, "--calib-images", "8", "--calib-train", "affine", "-o", affine))
    ok(invoke(*common, "--calib-train", "all", "-o", everything))
    return {"affine": affine, "all": everything}


def _calibration_record(directory) -> dict:
    return json.loads((directory / "config.json").read_text())["wsurgery"]["calibration"]


def test_convert_calib_images_limits_the_images_used(base, calibrated):
    assert base["num_images"] > 8
    limited = _calibration_record(calibrated["affine"])
    assert limited["num_images"] + limited["num_held_out"] == 8
    assert limited["num_held_out"] > 0
    unlimited = _calibration_record(calibrated["all"])  # default --calib-images 256: every one of the files
    assert unlimited["num_images"] + unlimited["num_held_out"] == base["num_images"]


def test_convert_calib_train_is_recorded_and_respected(base, calibrated):
    state = base["state"]
    plain = timm.create_model(MODEL, pretrained=False)
    convs = conv_names(plain)
    # GN takes each BN's place and copies its affine, so the checkpoint holds the norm affines before calibration
    norm_affine = [f"{n}.{p}" for n, m in plain.named_modules() if isinstance(m, nn.BatchNorm2d)
                   for p in ("weight", "bias")]
    assert norm_affine and all(k in state for k in norm_affine)

    for train in ("affine", "all"):
        record = _calibration_record(calibrated[train])
        assert record["train"] == train and record["config"]["train"] == train
        assert record["phases"] == ["distill"] and record["steps"] == 3 and record["reverted"] == []

    def original_weights(model):
        return {n: model.get_submodule(n).parametrizations.weight.original.detach() for n in convs}

    affine = wsurgery.load(calibrated["affine"])
    affine_state = affine.state_dict()
    assert all(isinstance(affine.get_submodule(k.rsplit(".", 1)[0]), nn.GroupNorm) for k in norm_affine)
    # affine: conv weights and the classifier untouched, the norm affines trained
    for name, w in original_weights(affine).items():
        assert torch.equal(w, state[f"{name}.weight"]), name
    assert torch.equal(affine_state["classifier.weight"], state["classifier.weight"])
    assert any(not torch.equal(affine_state[k], state[k]) for k in norm_affine)

    everything = wsurgery.load(calibrated["all"])
    all_state = everything.state_dict()
    # all: every conv and the classifier trained too
    for name, w in original_weights(everything).items():
        assert not torch.equal(w, state[f"{name}.weight"]), name
    assert not torch.equal(all_state["classifier.weight"], state["classifier.weight"])


# ---------------------------------------------------------------------------- export


def test_export_opset_is_written_into_the_onnx_file(base, tmp_path):
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    opset = 14
    assert opset != wsurgery.deploy.DEFAULT_OPSET  # else the flag would not be tested
    out = tmp_path / "e"
    ok(invoke("export", base["runs"], "-o", out, "--format", "onnx", "--opset", opset, "--img-size", 64))
    proto = onnx.load(str(out / "model.onnx"))
    default_domain = [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")]
    assert default_domain == [opset]
    # the graph is for the --img-size asked for
    dims = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [3, 64, 64]


# ---------------------------------------------------------------------------- verify


def _inputs(stdout: str) -> int:
    return int(kv(stdout)["inputs"])


def test_verify_images_adds_one_input_per_image(base):
    plain = invoke("verify", base["export"], "--against", base["runs"], "--num-random", "2")
    ok(plain)
    assert _inputs(plain.stdout) == 2
    with_images = invoke("verify", base["export"], "--against", base["runs"], "--num-random", "2",
                         "--images", base["images"])
    ok(with_images)
    assert _inputs(with_images.stdout) == 2 + base["num_images"]
    assert kv(with_images.stdout)["result"] == "pass"


def test_verify_rtol_decides_pass_or_fail(base, perturbed):
    api = wsurgery.verify(perturbed, base["runs"], num_random=2, seed=0)
    assert api.max_rel > 1e-5  # the nudge is visible at the default fp32 tolerance ...
    args = ["verify", perturbed, "--against", base["runs"], "--num-random", "2"]
    one_error(invoke(*args), 1, "differs", "max rel diff")
    loose = 2 * api.max_rel  # ... and within a tolerance twice its size
    result = invoke(*args, "--rtol", loose)
    out = ok(result)
    assert kv(result.stdout)["result"] == "pass"
    assert f"(tolerance {loose:g})" in out
    one_error(invoke(*args, "--rtol", api.max_rel / 2), 1, "differs", f"> {api.max_rel / 2:g}")


def test_verify_seed_changes_the_random_inputs(base, perturbed):
    printed = {}
    for seed in (0, 1):
        result = invoke("verify", perturbed, "--against", base["runs"], "--num-random", "2", "--seed", seed,
                        "--rtol", "1")
        ok(result)
        printed[seed] = kv(result.stdout)["max |diff|"]
        api = wsurgery.verify(perturbed, base["runs"], num_random=2, seed=seed, rtol=1)
        assert printed[seed] == f"{api.max_abs:.3g}"
    assert printed[0] != printed[1]


# ---------------------------------------------------------------------------- predict, compare


def _predictions(stdout: str) -> list[tuple[str, str, str]]:
    """(image, class, probability) per row of predict's table (the image only on its first row)."""
    out, image = [], None
    for cells in table_rows(stdout):
        if len(cells) != 4:
            continue
        image = cells[0] or image
        out.append((image, cells[2], cells[3]))
    return out


def _api_predictions(model, images, topk: int, img_size) -> list[tuple[str, str, str]]:
    return [(str(p.path), name, f"{prob:.1%}")
            for p in wsurgery.predict(model, [str(images)], topk, img_size=img_size)
            for name, prob in zip(p.labels, p.probs)]


def test_predict_img_size_is_the_size_the_model_sees(base):
    result = invoke("predict", base["export"], base["images"], "--topk", NUM_CLASSES, "--img-size", 64)
    ok(result)
    printed = _predictions(result.stdout)
    assert len(printed) == base["num_images"] * NUM_CLASSES
    model = wsurgery.load(base["export"])
    at_64 = _api_predictions(model, base["images"], NUM_CLASSES, 64)
    default = _api_predictions(model, base["images"], NUM_CLASSES, None)
    assert at_64 != default  # the size changes the answer, so the comparison below means something
    assert printed == at_64


def test_compare_limit_is_the_number_of_images(base, gn_runs):
    assert base["num_images"] > 5
    limited = invoke("compare", gn_runs, base["runs"], "--images", base["images"], "--limit", 5)
    ok(limited)
    assert kv(limited.stdout)["images"] == "5"
    full = invoke("compare", gn_runs, base["runs"], "--images", base["images"])
    ok(full)
    assert kv(full.stdout)["images"] == str(base["num_images"])


def test_compare_img_size_is_the_size_both_models_see(base, gn_runs):
    result = invoke("compare", gn_runs, base["runs"], "--images", base["images"], "--img-size", 64)
    ok(result)
    printed = kv(result.stdout)
    at_64 = wsurgery.compare(gn_runs, base["runs"], [str(base["images"])], img_size=64)
    default = wsurgery.compare(gn_runs, base["runs"], [str(base["images"])])
    assert f"{at_64.kl:.4f}" != f"{default.kl:.4f}"
    assert printed["KL(B || A)"] == f"{at_64.kl:.4f} nats"
    assert printed["top-5 overlap"] == f"{at_64.top5_overlap:.1%}"
    assert printed["images"] == str(base["num_images"])


# ---------------------------------------------------------------------------- inspect, train


def test_inspect_a_timm_model_name():
    data = json.loads(ok(invoke("inspect", "resnet10t", "--json")))
    model = timm.create_model("resnet10t", pretrained=False)
    expected = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    assert [r["name"] for r in data["rows"]] == expected
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    bns = sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert data["counts"] == {"plain convs": convs, "batch norms": bns}
    assert data["architecture"] == "resnet10t" and data["stage"] == "plain" and data["surgery"] is None
    assert data["num_params"] == sum(p.numel() for p in model.parameters())
    # an unknown name is one error line, not a traceback
    one_error(invoke("inspect", "resnet10tt"), 1, "resnet10tt")


def test_train_help_recipe_lists_every_recipe_key():
    from wsurgery.recipes import Recipe

    result = invoke("train", "--help-recipe")
    ok(result)
    keys = [cells[0] for cells in table_rows(result.stdout) if cells[0]]
    assert keys == [f.name for f in dataclasses.fields(Recipe)]
    # each help text printed whole: "[min, max]" in aug_scale's is text, not rich markup to drop
    wide = CliRunner().invoke(app, ["train", "--help-recipe"], env={"COLUMNS": "400"})
    printed = " ".join(" ".join(c for c in cells if c) for cells in table_rows(wide.stdout))
    printed = " ".join(printed.split())
    for f in dataclasses.fields(Recipe):
        assert " ".join(f.metadata["help"].split()) in printed, f.name


@pytest.mark.parametrize("args", [[], ["resnet10t"], ["-o", "OUT"]])
def test_train_without_model_or_output_is_a_usage_error(tmp_path, args):
    args = [str(tmp_path / "out") if a == "OUT" else a for a in args]
    one_error(invoke("train", *args), 2, "MODEL", "--output")
    assert list(tmp_path.iterdir()) == []


def test_fold_bn_with_nothing_to_fold_says_so(base, gn_runs, tmp_path):
    """--fold-bn on a GroupNorm model folded nothing and said nothing ("BN folded into convs 0")."""
    nothing = invoke("export", gn_runs, "-o", tmp_path / "gn", "--fold-bn")
    ok(nothing)  # the note goes to stderr, with the other notes: stdout holds the result
    assert "found no BatchNorm" in nothing.stderr and kv(nothing.stdout)["BN folded into convs"] == "0"
    folded = invoke("export", base["runs"], "-o", tmp_path / "bn", "--fold-bn")
    ok(folded)
    assert "found no BatchNorm" not in folded.stderr and int(kv(folded.stdout)["BN folded into convs"]) > 0


# --- flags that would be ignored silently (a review of help texts against the code) -----------------------------


@pytest.mark.parametrize("args,named", [
    (["--calib-steps", "5"], "--calib-steps"), (["--no-calib-augment"], "error: --no-calib-augment has"),
    (["--no-calib-anchor"], "error: --no-calib-anchor has"), (["--calib-anchor"], "error: --calib-anchor has")])
def test_calibration_flags_without_calibration_are_refused(tmp_path, args, named):
    """Without --calib-data every --calib-* setting was dropped without a word (exit 0)."""
    one_error(invoke("convert", "resnet10t", "--no-pretrained", "-o", tmp_path / "c", *args), 2, named,
              "has no effect: calibration is off (no --calib-data)")
    assert not (tmp_path / "c").exists()
    # an explicit --calibrate none is an off switch: a script may keep its usual --calib-* flags
    ok(invoke("convert", "resnet10t", "--no-pretrained", "-o", tmp_path / "c", "--calibrate", "none",
              "--calib-data", tmp_path, *args))
    assert (tmp_path / "c" / "config.json").is_file()


@pytest.mark.parametrize("step", ["--calib-precondition", "--calib-anchor"])
@pytest.mark.parametrize("args,fix", [([], "is a step of gn-init, for models whose BatchNorms become GroupNorm; add "
                                           "--norm gn"),
                                      (["--norm", "gn", "--calibrate", "distill"], "--calibrate distill does not"),
                                      (["--norm", "gn"], "works on adaptive WS convs, and --mode ws has none; use "
                                                         "--mode aws")])
def test_precondition_where_gn_init_does_not_run_is_refused_before_loading(tmp_path, args, fix, step):
    """--calib-precondition with --norm keep (or a method without gn-init, or plain WS) did nothing and was
    recorded as done."""
    one_error(invoke("convert", "resnet10t", "--no-pretrained", "-o", tmp_path / "c", "--calib-data", tmp_path,
                     step, *args), 2, step, fix)


@pytest.mark.parametrize("command", [["export", "resnet10t", "--no-pretrained", "-o", "OUT"],
                                     ["convert", "resnet10t", "--no-pretrained", "-o", "OUT"],
                                     ["compare", "resnet10t", "resnet10t", "--images", "IMAGES"]])
def test_remap_by_order_without_a_checkpoint_is_refused(tmp_path, command):
    from _data import make_folder

    images = make_folder(tmp_path / "img", per_class=1)
    args = [str(tmp_path / "o") if a == "OUT" else str(images) if a == "IMAGES" else a for a in command]
    one_error(invoke(*args, "--remap-by-order"), 2, "--remap-by-order", "checkpoint", "drop it")
    assert not (tmp_path / "o").exists()


def test_train_from_a_directory_refuses_weight_flags(tmp_path):
    import wsurgery

    wsurgery.save(wsurgery.convert(timm.create_model("resnet10t", num_classes=3), mode="ws")[0], tmp_path / "c")
    for flags, named in ((["--remap-by-order"], "--remap-by-order"), (["--no-pretrained"], "--pretrained")):
        one_error(invoke("train", tmp_path / "c", "--data", tmp_path, "-o", tmp_path / "r", *flags), 2,
                  "already holds its weights", named)
