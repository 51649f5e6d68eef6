"""What save/export write always loads back, and the ways of naming a directory load accepts.

save and export refuse (before anything is written) a model that load could not rebuild: a folded
model handed to save, constructor arguments JSON cannot hold, a model changed after it was built
(timm's freeze_batch_norm_2d). load takes ``local-dir:DIR`` as it takes ``DIR`` and reads the
directories timm's own ``save_for_hf`` writes by default (``pytorch_model.bin``).
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from _cli import invoke, ok
from _data import make_folder
from timm.models._hub import save_for_hf
from timm.utils.model import freeze_batch_norm_2d
from torch.testing import assert_close

import wsurgery
from wsurgery.errors import ConversionError, InputNotFoundError, UsageError


def _converted(**model_args):
    model = wsurgery.load("test_efficientnet", pretrained=False, num_classes=3, model_args=model_args or None)
    return wsurgery.convert(model, mode="aws")[0]


def _x():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_save_refuses_a_folded_model_and_writes_nothing(tmp_path):
    converted = _converted()
    for folded in (wsurgery.fold(converted), wsurgery.load(wsurgery.export(converted, tmp_path / "e").directory)):
        try:
            wsurgery.save(folded, tmp_path / "s")
        except ConversionError as e:
            assert "folded" in str(e) and "wsurgery.export" in str(e)
        else:
            raise AssertionError("save wrote a folded model that load cannot rebuild")
        assert not (tmp_path / "s").exists()
    # a folded export converted again is a converted model: save takes it, load rebuilds it
    again = wsurgery.convert(wsurgery.load(tmp_path / "e"), mode="aws")[0]
    wsurgery.save(again, tmp_path / "again")
    with torch.no_grad():
        assert_close(wsurgery.load(tmp_path / "again")(_x()), again.eval()(_x()))


def test_constructor_args_json_cannot_hold_are_refused_before_writing(tmp_path):
    model = _converted(act_layer=torch.nn.Hardswish)
    for write in (lambda: wsurgery.save(model, tmp_path / "s"), lambda: wsurgery.export(model, tmp_path / "e")):
        try:
            write()
        except ConversionError as e:
            assert "model_args['act_layer']" in str(e) and "config.json" in str(e)
        else:
            raise AssertionError("a directory load cannot rebuild was written")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    # timm's name for the same layer is JSON, and the directory loads back to the same function
    named = _converted(act_layer="hard_swish")
    wsurgery.save(named, tmp_path / "named")
    with torch.no_grad():
        assert_close(wsurgery.load(tmp_path / "named")(_x()), named.eval()(_x()))


def test_a_model_changed_after_it_was_built_is_refused(tmp_path):
    frozen = freeze_batch_norm_2d(wsurgery.load("test_efficientnet", pretrained=False, num_classes=3))
    converted = wsurgery.convert(frozen, mode="aws", inplace=False)[0]
    for writer, write in (("save", wsurgery.save), ("export", wsurgery.export)):
        try:
            write(converted, tmp_path / writer)
        except ConversionError as e:
            assert f"{writer} refuses" in str(e) and "num_batches_tracked" in str(e)
            assert "unfreeze_batch_norm_2d" in str(e)
        else:
            raise AssertionError(f"{writer} wrote a directory that does not load")
        assert not (tmp_path / writer).exists()


def test_local_dir_prefix_takes_every_argument_the_path_does(tmp_path):
    saved = wsurgery.save(_converted(), tmp_path / "s")
    assert wsurgery.load(f"local-dir:{saved}", num_classes=5).num_classes == 5
    assert wsurgery.load(saved, num_classes=5).num_classes == 5
    try:
        wsurgery.load(f"local-dir:{saved}", pretrained=True)
    except UsageError as e:
        assert "pretrained (--pretrained) does not apply" in str(e)
    else:
        raise AssertionError("local-dir: dropped an argument the plain path refuses")
    try:
        wsurgery.load(f"local-dir:{tmp_path / 'resnet18'}")
    except InputNotFoundError as e:
        assert "is not a directory" in str(e)
    else:
        raise AssertionError("local-dir: of a missing directory fell back to a timm name")


def test_timm_save_for_hf_directory_with_pytorch_model_bin_loads(tmp_path):
    model = timm.create_model("resnet18", pretrained=False, num_classes=7).eval()
    save_for_hf(model, tmp_path / "hf")  # timm's default: pytorch_model.bin, read with weights_only=True
    assert (tmp_path / "hf" / "pytorch_model.bin").is_file()
    assert not (tmp_path / "hf" / "model.safetensors").exists()
    loaded = wsurgery.load(tmp_path / "hf")
    with torch.no_grad():
        assert_close(loaded(_x()), model(_x()))
    assert wsurgery.load(f"local-dir:{tmp_path / 'hf'}").num_classes == 7


def test_compare_remap_by_order_applies_to_the_model_given_a_checkpoint(tmp_path):
    original = timm.create_model("test_efficientnet", pretrained=False).eval()
    torch.save(original.state_dict(), tmp_path / "weights.pth")
    converted = wsurgery.convert(wsurgery.load("test_efficientnet", checkpoint=tmp_path / "weights.pth"),
                                 mode="aws")[0]
    saved = wsurgery.save(converted, tmp_path / "s")
    images = make_folder(tmp_path / "images", per_class=2, size=32)
    result = invoke("compare", saved, "test_efficientnet", "--b-checkpoint", tmp_path / "weights.pth",
                    "--remap-by-order", "--images", images, "--json")
    ok(result)
    # adaptive WS with BN kept is exact: the directory agrees with the checkpoint it came from
    agreement = json.loads(result.stdout)
    assert agreement["top1"] == 1.0 and agreement["num_images"] == 6 and agreement["kl"] < 1e-6


def test_models_built_with_one_input_channel_export_and_verify(tmp_path):
    """timm keeps pretrained_cfg's 3 channels for in_chans=1: the checks take the model's own first conv."""
    pytest.importorskip("onnxruntime")
    from wsurgery import deploy
    from wsurgery.convert import pooled_norms

    model = wsurgery.load("test_efficientnet", pretrained=False, num_classes=3, model_args={"in_chans": 1})
    assert model.pretrained_cfg["input_size"][0] == 3 and pooled_norms(model) is not None
    converted = wsurgery.convert(model, mode="aws")[0]
    result = wsurgery.export(converted, tmp_path / "e", verify=True)
    assert result.timm_compatible and result.verification.passed
    stock = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True).eval()
    x = torch.randn(2, 1, 40, 40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(stock(x), converted.eval()(x))
    onnx = deploy.export_onnx(converted, tmp_path / "m.onnx", verify=True)
    assert onnx.input_size[0] == 1 and onnx.verification.passed
    assert deploy.export_program(converted, tmp_path / "m.pt2", verify=True).verification.passed


def test_image_commands_refuse_a_one_channel_model_in_one_line(tmp_path):
    """Image files are read as RGB: train, predict, compare and calibration name in_chans (was torch's raw error)."""
    make_folder(tmp_path / "data", per_class=2, classes=("a", "b"))
    model = wsurgery.load("test_efficientnet", pretrained=False, num_classes=2, model_args={"in_chans": 1})
    converted = wsurgery.convert(model, mode="aws", inplace=False)[0]
    images = str(tmp_path / "data")
    calls = {
        "predict": lambda: wsurgery.predict(model, images),
        "compare": lambda: wsurgery.compare(model, converted, images),
        "calibrate": lambda: wsurgery.calibrate(converted, model, images),
        "train": lambda: wsurgery.train(model, images, tmp_path / "run", overrides={"epochs": 1}),
    }
    for name, call in calls.items():
        with pytest.raises(UsageError, match=r"1-channel input .* in_chans=3") as info:
            call()
        assert "\n" not in str(info.value), name
    assert not (tmp_path / "run").exists()
    wsurgery.save(model, tmp_path / "m1")
    result = invoke("predict", str(tmp_path / "m1"), images)
    assert result.exit_code != 0 and "in_chans=3" in result.stderr and "Traceback" not in result.stderr
