"""Save/load, export, checkpoints, GroupNorm groups, validation before mutation, the report,
and timm's own WS convs (issue 2, parts 2, 4-7)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections import OrderedDict

import pytest
import timm
import torch
from _core_helpers import assert_no_standardization, assert_rel_close, randomize_norms, rel_diff
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import (
    BatchNormAct2d,
    Conv2dSame,
    FrozenBatchNormAct2d,
    GroupNorm,
    GroupNorm1,
    GroupNormAct,
    ScaledStdConv2d,
    ScaledStdConv2dSame,
    StdConv2d,
    StdConv2dSame,
)
from timm.layers.norm_act import GroupNorm1Act
from torch import nn
from torch.nn.utils import parametrize
from torch.testing import assert_close

import wsurgery
from wsurgery.convert import clone_model, ws_parametrizations
from wsurgery.errors import (
    CheckpointMismatchError,
    ConfigError,
    ConversionError,
    NonFiniteWeightsError,
    OutputExistsError,
    UnsafeCheckpointError,
)
from wsurgery.fold import fold
from wsurgery.norm import batchnorm_to_groupnorm, gn_num_groups, is_batchnorm

SIZE = 48


def _timm(name: str, **kw) -> nn.Module:
    torch.manual_seed(0)  # also builds module-scoped fixtures: the same weights whatever ran before
    model = timm.create_model(name, pretrained=False, **kw)
    randomize_norms(model)
    return model.eval()


def _x(n: int = 2, size: int = SIZE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _type_names(model: nn.Module) -> list[list[str]]:
    # a parametrized module's class is created on the fly; its base is the real class
    return [[n, type(m).__name__, type(m).__mro__[1].__name__] for n, m in model.named_modules()]


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def r18():
    return _timm("resnet18", num_classes=10)


# ---------------------------------------------------------------- save -> load in a fresh process

_CHILD = textwrap.dedent(
    """
    import json, sys, torch
    from safetensors.torch import load_file, save_file
    import wsurgery
    from wsurgery.convert import ws_parametrizations
    out = {}
    types = {}
    x = load_file(sys.argv[1])["x"]
    for d in sys.argv[3:]:
        m = wsurgery.load(d)
        with torch.no_grad():
            out[d] = m(x)
        types[d] = [[n, type(mod).__name__, type(mod).__mro__[1].__name__] for n, mod in m.named_modules()]
        types[d + ":ws"] = sum(1 for _ in ws_parametrizations(m))
    save_file({k: v.contiguous() for k, v in out.items()}, sys.argv[2])
    print(json.dumps(types))
    """
)


def test_save_then_load_in_fresh_process_is_identical(tmp_path):
    x = _x()
    cases = {
        "r18-aws-gn": (_timm("resnet18"), dict(mode="aws", norm="gn")),
        "lite0-ws-paper": (_timm("tf_efficientnet_lite0"), dict(mode="ws", convention="paper")),
        "mixnet-aws-gn-gs": (_timm("mixnet_s"), dict(mode="aws", norm="gn", gn_group_size=4)),
    }
    expected, types, n_ws = {}, {}, {}
    for tag, (model, cfg) in cases.items():
        converted, report = wsurgery.convert(model, **cfg, trace=False)
        with torch.no_grad():  # nudge the adaptive params so they are really saved, not re-initialised
            for _, _, p in ws_parametrizations(converted):
                if hasattr(p, "gain"):
                    p.gain.mul_(1.01)
                    p.shift.add_(0.001)
            expected[tag] = converted(x)
        d = tmp_path / tag
        wsurgery.save(converted, d, report=report)
        assert (d / "model.safetensors").is_file() and (d / "config.json").is_file()
        config = json.loads((d / "config.json").read_text())
        assert config["wsurgery"]["surgery"]["mode"] == cfg["mode"]
        assert config["wsurgery"]["version"] == wsurgery.__version__
        assert config["architecture"] == model.pretrained_cfg["architecture"]
        types[str(d)] = _type_names(converted)
        n_ws[str(d)] = sum(1 for _ in ws_parametrizations(converted))
    save_file({"x": x}, str(tmp_path / "x.safetensors"))
    dirs = [str(tmp_path / t) for t in cases]
    proc = subprocess.run(
        [sys.executable, "-c", _CHILD, str(tmp_path / "x.safetensors"), str(tmp_path / "out.safetensors"), *dirs],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, HF_HUB_OFFLINE="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    child_types = json.loads(proc.stdout.strip().splitlines()[-1])
    outs = load_file(str(tmp_path / "out.safetensors"))
    for tag, d in zip(cases, dirs):
        assert torch.equal(outs[d], expected[tag]), f"{tag}: outputs differ after reload"
        assert child_types[d] == types[d], f"{tag}: module types differ after reload"
        assert child_types[d + ":ws"] == n_ws[d] > 0


def test_save_refuses_to_overwrite(r18, tmp_path):
    converted, _report = wsurgery.convert(r18, inplace=False, trace=False)
    wsurgery.save(converted, tmp_path / "s")
    before = (tmp_path / "s" / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--force"):
        wsurgery.save(converted, tmp_path / "s")
    assert (tmp_path / "s" / "model.safetensors").stat().st_mtime_ns == before
    wsurgery.save(converted, tmp_path / "s", force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # no temporary leftovers


# ------------------------------------------------------------------------------------- export


@pytest.mark.parametrize("dtype,torch_dtype,rtol", [("fp16", torch.float16, 1e-2), ("bf16", torch.bfloat16, 5e-2)])
def test_export_dtype(r18, tmp_path, dtype, torch_dtype, rtol):
    converted, _ = wsurgery.convert(r18, mode="aws", inplace=False, trace=False)
    result = wsurgery.export(converted, tmp_path / dtype, dtype=dtype)
    assert result.dtype == dtype
    with safe_open(str(tmp_path / dtype / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    assert meta["format"] == "pt" and json.loads(meta["wsurgery"])["dtype"] == dtype
    assert torch_dtype in dtypes and torch.float32 not in dtypes
    x = _x()
    with torch.no_grad():
        ref = converted(x)
        out = wsurgery.load(tmp_path / dtype)(x)
    d = rel_diff(out, ref)
    assert 0 < d <= rtol  # rounded, but close
    check = wsurgery.verify(tmp_path / dtype, converted)
    assert check.passed and check.rtol == rtol
    # the other way round: an fp32 export of a half model is held to the half model's tolerance
    half = clone_model(converted).to(torch_dtype)
    check = wsurgery.export(half, tmp_path / f"fp32-of-{dtype}", verify=True).verification
    assert check.rtol == rtol and check.passed and check.max_rel > 1e-5  # fp32's own 1e-5 would fail it
    with pytest.raises(ConfigError, match="dtype"):
        wsurgery.export(converted, tmp_path / "bad", dtype="fp8")
    assert not (tmp_path / "bad").exists()


def test_export_metadata_and_stock_timm(r18, tmp_path):
    converted, _ = wsurgery.convert(r18, mode="ws", inplace=False, trace=False)
    result = wsurgery.export(converted, tmp_path / "e")
    assert result.timm_compatible
    config = json.loads((tmp_path / "e" / "config.json").read_text())
    assert config["wsurgery"]["stage"] == "folded" and config["wsurgery"]["timm_compatible"] is True
    assert config["num_classes"] == 10 and config["architecture"] == "resnet18"
    with safe_open(str(tmp_path / "e" / "model.safetensors"), "pt") as f:
        assert not any("parametrizations" in k for k in f.keys())  # noqa: SIM118 (safe_open is not iterable)
        record = json.loads(f.metadata()["wsurgery"])
    assert record["surgery"]["mode"] == "ws"
    stock = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True).eval()
    x = _x()
    with torch.no_grad():
        assert_rel_close(stock(x), converted(x), 1e-5, "stock timm reload")
    assert parametrize.is_parametrized(converted.conv1)  # export leaves its input converted


@pytest.mark.parametrize("name,act_type", [("resnet18", None), ("efficientnet_b0", nn.SiLU), ("densenet121", nn.ReLU)])
def test_export_fold_bn(tmp_path, name, act_type):
    model = _timm(name)
    converted, _ = wsurgery.convert(model, mode="aws", inplace=False, trace=False)
    result = wsurgery.export(converted, tmp_path / "e", fold_bn=True)
    assert result.fold_bn, "no conv+BN pair found"
    assert not result.timm_compatible  # BN folded into conv biases: stock timm cannot express it
    reloaded = wsurgery.load(tmp_path / "e")
    assert_no_standardization(reloaded, "fold_bn export")
    x = _x()
    with torch.no_grad():
        assert_rel_close(reloaded(x), converted(x), 1e-5, "fold_bn export")  # verify's fp32 tolerance
    for conv_name, bn_name in result.fold_bn:
        bn_old = converted.get_submodule(bn_name)
        bn_new = reloaded.get_submodule(bn_name)
        assert not is_batchnorm(bn_new), f"{bn_name} still a BatchNorm"
        assert reloaded.get_submodule(conv_name).bias is not None
        if isinstance(bn_old, BatchNormAct2d) and not isinstance(bn_old.act, nn.Identity):
            assert isinstance(bn_new.act, type(bn_old.act)), f"{bn_name}: activation lost"
    if act_type is not None:
        count = lambda m: sum(isinstance(s, act_type) for s in m.modules())  # noqa: E731
        assert count(reloaded) == count(converted) > 0
    # fold(fold_bn=True) on its own, too
    folded = fold(converted, fold_bn=True)
    assert [list(p) for p in folded.wsurgery_folded_bn] == result.fold_bn
    with torch.no_grad():
        assert_rel_close(folded(x), converted(x), 1e-5, "fold(fold_bn=True)")


def test_fold_refuses_non_finite(r18):
    converted, _ = wsurgery.convert(r18, inplace=False, trace=False)
    with torch.no_grad():
        converted.layer1[0].conv1.parametrizations.weight.original[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match=r"layer1.0.conv1"):
        fold(converted)
    with pytest.raises(NonFiniteWeightsError):
        wsurgery.fold(converted, inplace=True)
    assert parametrize.is_parametrized(converted.layer1[0].conv1)  # nothing changed


# ----------------------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def r18_state():
    model = _timm("resnet18")
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_loaded(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    _assert_same_state(dict(model.state_dict().items()), state)


@pytest.mark.parametrize("layout", ["safetensors", "pth", "state_dict", "model", "module_prefix", "nested"])
def test_checkpoint_formats(tmp_path, r18_state, layout):
    if layout == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in r18_state.items()}, str(path))
    else:
        obj = dict(r18_state)
        if layout == "state_dict":
            obj = {"state_dict": obj, "epoch": 3}
        elif layout == "model":
            obj = {"model": obj, "optimizer": {"lr": 0.1}}
        elif layout == "module_prefix":
            obj = {f"module.{k}": v for k, v in obj.items()}
        elif layout == "nested":
            obj = {"checkpoint": 1, "model": {"state_dict": {f"module.{k}": v for k, v in obj.items()}}}
        path = tmp_path / "w.pth"
        torch.save(obj, path)
    model = wsurgery.load("resnet18", checkpoint=path)
    _assert_loaded(model, r18_state)
    assert model.wsurgery_source["checkpoint"] == str(path) and model.wsurgery_source["pretrained"] is False


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoint_unsafe_pickle_refused(tmp_path, r18_state):
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": r18_state, "hook": _Evil()}, path)
    with pytest.raises(UnsafeCheckpointError, match="safetensors"):
        wsurgery.load("resnet18", checkpoint=path)


def test_checkpoint_mismatch_names_the_key(tmp_path, r18_state):
    bad = dict(r18_state)
    bad.pop("layer2.0.conv1.weight")
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointMismatchError, match=r"layer2.0.conv1.weight"):
        wsurgery.load("resnet18", checkpoint=tmp_path / "missing.pth")
    torch.save(r18_state, tmp_path / "r18.pth")
    with pytest.raises(CheckpointMismatchError, match=r"remap-by-order|another architecture|missing key"):
        wsurgery.load("resnet34", checkpoint=tmp_path / "r18.pth")


def test_remap_by_order(tmp_path, r18_state):
    renamed = OrderedDict((f"backbone.t{i:03d}", v) for i, v in enumerate(r18_state.values()))
    path = tmp_path / "other_impl.pth"
    torch.save(renamed, path)
    with pytest.raises(CheckpointMismatchError):
        wsurgery.load("resnet18", checkpoint=path)
    model = wsurgery.load("resnet18", checkpoint=path, remap_by_order=True)
    _assert_loaded(model, r18_state)
    wrong = OrderedDict(list(renamed.items())[:-1])
    torch.save(wrong, tmp_path / "short.pth")
    with pytest.raises(CheckpointMismatchError, match="tensors"):
        wsurgery.load("resnet18", checkpoint=tmp_path / "short.pth", remap_by_order=True)


def test_remap_by_order_from_safetensors_says_the_file_keeps_no_order(tmp_path, r18_state):
    """safetensors sorts its tensors by dtype and name, so a renamed .safetensors file cannot be
    remapped by order: the mismatch names that, and the fix (the original .pth)."""
    from safetensors.torch import save_file

    renamed = {f"t{i}": v for i, v in enumerate(r18_state.values())}  # t10 sorts before t2
    save_file(renamed, tmp_path / "other_impl.safetensors")
    with pytest.raises(CheckpointMismatchError, match=r"keeps no order .*sorted by dtype and name.*\.pth"):
        wsurgery.load("resnet18", checkpoint=tmp_path / "other_impl.safetensors", remap_by_order=True)
    torch.save(renamed, tmp_path / "other_impl.pth")
    with pytest.raises(CheckpointMismatchError) as e:  # not said of a file that keeps its order
        wsurgery.load("resnet34", checkpoint=tmp_path / "other_impl.pth", remap_by_order=True)
    assert "keeps no order" not in str(e.value)


def test_remap_by_order_with_a_new_head(tmp_path, r18_state):
    renamed = OrderedDict((f"backbone.t{i:03d}", v) for i, v in enumerate(r18_state.values()))
    torch.save(renamed, tmp_path / "other_impl.pth")
    model = wsurgery.load("resnet18", checkpoint=tmp_path / "other_impl.pth", remap_by_order=True, num_classes=7)
    assert model.fc.out_features == 7
    body = {k: v for k, v in r18_state.items() if not k.startswith("fc.")}
    for key, value in body.items():
        torch.testing.assert_close(model.state_dict()[key], value, rtol=0, atol=0)


def test_num_classes_with_checkpoint(tmp_path, r18_state):
    torch.save(r18_state, tmp_path / "w.pth")
    model = wsurgery.load("resnet18", checkpoint=tmp_path / "w.pth", num_classes=7)
    assert model.num_classes == 7 and model.fc.out_features == 7
    state = model.state_dict()
    for k, v in r18_state.items():
        if not k.startswith("fc."):
            assert torch.equal(state[k], v), k
    fresh = wsurgery.load("resnet18", pretrained=False, num_classes=3)
    assert fresh.fc.out_features == 3


# --------------------------------------------------------------------------------- GroupNorm rule


@pytest.mark.parametrize(
    "channels,groups,size,rule,expected",
    [
        (64, 32, None, "gcd", 32),
        (24, 32, None, "gcd", 8),  # 8 groups of 3
        (24, 32, None, "divisor", 24),  # 24 groups of 1
        (48, 32, None, "gcd", 16),
        (48, 32, None, "divisor", 24),
        (40, 32, None, "gcd", 8),
        (40, 32, None, "divisor", 20),
        (7, 32, None, "gcd", 1),
        (7, 32, None, "divisor", 7),
        (24, 32, 8, "gcd", 3),
        (64, 32, 16, "error", 4),
    ],
)
def test_gn_group_rule(channels, groups, size, rule, expected):
    got = gn_num_groups(channels, groups, size, rule)
    assert got == expected and channels % got == 0


def test_gn_group_rule_errors():
    with pytest.raises(ConversionError, match="24 channels are not divisible by 32"):
        gn_num_groups(24, 32, None, "error")
    with pytest.raises(ConversionError, match="groups of 5"):
        gn_num_groups(24, 32, 5)
    with pytest.raises(ConfigError, match="gn_group_rule"):
        wsurgery.SurgeryConfig(gn_group_rule="nearest")
    with pytest.raises(ConfigError, match="gn_groups"):
        wsurgery.SurgeryConfig(gn_groups=0)


def test_gn_groups_in_a_model_that_does_not_divide():
    """mobilenetv2_050 has 8/16/24/48... channel BNs: what each rule gives, layer by layer."""
    model = _timm("mobilenetv2_050")
    channels = {n: m.num_features for n, m in model.named_modules() if is_batchnorm(m)}
    assert any(c % 32 for c in channels.values())
    for rule in ("gcd", "divisor"):
        converted, report = wsurgery.convert(model, norm="gn", gn_group_rule=rule, inplace=False, trace=False)
        for name, c in channels.items():
            gn = converted.get_submodule(name)
            assert isinstance(gn, nn.GroupNorm)
            assert gn.num_groups == gn_num_groups(c, 32, None, rule)
            assert f"{gn.num_groups} groups" in next(ch.note for ch in report.changes if ch.name == name)
    first_bad = next(n for n, c in channels.items() if c % 32)
    before, types = _state(model), _type_names(model)
    with pytest.raises(ConversionError, match=first_bad.replace(".", r"\.")):
        wsurgery.convert(model, norm="gn", gn_group_rule="error")
    _assert_same_state(_state(model), before)
    assert _type_names(model) == types


def test_norms_on_pooled_maps_get_one_group_and_keep_working(tmp_path):
    """ResNeSt's split attention runs fc1 -> bn1 on 1x1 (pooled) maps. GroupNorm with one channel
    per group would output its bias for every input; convert gives those layers one group."""
    model = _timm("resnest14d")
    attn_bns = {f"{n}.bn1" for n, m in model.named_modules() if type(m).__name__ == "SplitAttn"}
    assert attn_bns  # the model has split-attention blocks
    assert wsurgery.pooled_norms(model) == frozenset(attn_bns)
    converted, report = wsurgery.convert(model, mode="aws", norm="gn", inplace=False, trace=False)
    notes = {c.name: c.note for c in report.changes}
    for name, m in converted.named_modules():
        if isinstance(m, nn.GroupNorm):
            assert m.num_groups == (1 if name in attn_bns else gn_num_groups(m.num_channels, 32, None, "gcd")), name
            assert ("1x1" in notes[name]) == (name in attn_bns)
    # the attention GN now depends on its input: outputs differ between two images, unlike 32 groups of one value
    name = sorted(attn_bns)[0]
    seen = []
    handle = converted.get_submodule(name).register_forward_hook(lambda _m, _a, o: seen.append(o))
    converted.eval()
    with torch.no_grad():
        converted(torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)))
    handle.remove()
    gn = converted.get_submodule(name)
    assert not torch.allclose(seen[0][0], seen[0][1])
    naive = nn.GroupNorm(gn.num_channels, gn.num_channels, affine=True)
    naive.load_state_dict(gn.state_dict())
    x = torch.randn(2, gn.num_channels, 1, 1)
    # what the plain rule would have done: the bias whatever the input (up to rounding amplified by 1/sqrt(eps))
    assert_close(naive(x), gn.bias.detach().view(1, -1, 1, 1).expand_as(x), atol=1e-3, rtol=0)
    # a saved model rebuilds the same groups
    wsurgery.save(converted, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["wsurgery"]["pooled_norms"] == sorted(attn_bns)
    loaded = wsurgery.load(tmp_path / "m")
    assert loaded.get_submodule(name).num_groups == 1
    x = torch.randn(2, 3, 64, 64)
    assert_close(loaded.eval()(x), converted(x))


def test_groupnorm_copies_affine_and_keeps_activation():
    torch.manual_seed(0)
    bna = BatchNormAct2d(16, act_layer=nn.SiLU, drop_layer=None)
    randomize_norms(bna)
    gna = batchnorm_to_groupnorm(bna, 4)
    assert isinstance(gna, GroupNormAct) and gna.act is bna.act
    assert torch.equal(gna.weight, bna.weight) and torch.equal(gna.bias, bna.bias)
    x = torch.randn(2, 16, 5, 5)
    expected = nn.functional.silu(nn.functional.group_norm(x, 4, bna.weight, bna.bias, 1e-5))
    assert_close(gna(x), expected)
    for bn in (nn.BatchNorm2d(8), nn.SyncBatchNorm(8), FrozenBatchNormAct2d(8)):
        randomize_norms(bn)
        gn = batchnorm_to_groupnorm(bn, 2)
        assert isinstance(gn, GroupNorm if not isinstance(bn, FrozenBatchNormAct2d) else GroupNormAct)
        assert torch.equal(gn.weight, bn.weight) and torch.equal(gn.bias, bn.bias)
    # one group: timm's one-group classes (what stock timm builds for norm_layer='groupnorm1'), same numbers
    for bn in (BatchNormAct2d(16, act_layer=nn.SiLU, drop_layer=None), nn.BatchNorm2d(16)):
        randomize_norms(bn)
        gn1 = batchnorm_to_groupnorm(bn, 1)
        assert type(gn1) is (GroupNorm1Act if isinstance(bn, BatchNormAct2d) else GroupNorm1) and gn1.num_groups == 1
        act = gn1.act if isinstance(bn, BatchNormAct2d) else nn.Identity()
        assert act is getattr(bn, "act", act)
        assert_close(gn1(x), act(nn.functional.group_norm(x, 1, bn.weight, bn.bias, 1e-5)))
    from torchvision.ops.misc import FrozenBatchNorm2d

    fbn = FrozenBatchNorm2d(8)
    randomize_norms(fbn)
    gn = batchnorm_to_groupnorm(fbn, 2)
    assert isinstance(gn, GroupNorm) and torch.equal(gn.weight, fbn.weight)


# ---------------------------------------------------------------------- validation before mutation


def _failing_cases(model: nn.Module):
    last_conv = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)][-1]
    return {
        "nan in last conv": (dict(), last_conv, NonFiniteWeightsError),
        "gn groups do not divide": (dict(norm="gn", gn_group_size=7), "channels do not split", ConversionError),
        "include matches nothing": (dict(include=["nothing.*"]), "match no conv", ConversionError),
    }


@pytest.mark.parametrize("case", ["nan in last conv", "gn groups do not divide", "include matches nothing"])
def test_failure_leaves_model_untouched(case):
    model = _timm("resnet18")
    kwargs, match, err = _failing_cases(model)[case]
    if case == "nan in last conv":
        with torch.no_grad():
            model.get_submodule(match).weight[0, 0, 0, 0] = float("inf")
    before, types = _state(model), _type_names(model)
    with pytest.raises(err, match=match.replace(".", r"\.")):
        wsurgery.convert(model, **kwargs)
    _assert_same_state(_state(model), before)
    assert _type_names(model) == types
    assert not any(parametrize.is_parametrized(m) for m in model.modules())
    assert getattr(model, "wsurgery_config", None) is None


def test_converting_twice_is_refused_and_harmless(r18):
    converted, _ = wsurgery.convert(r18, inplace=False, trace=False)
    before, types = _state(converted), _type_names(converted)
    with pytest.raises(ConversionError, match="already converted"):
        wsurgery.convert(converted, norm="gn")
    _assert_same_state(_state(converted), before)
    assert _type_names(converted) == types


def test_inplace_false_leaves_original(r18):
    before, types = _state(r18), _type_names(r18)
    converted, _ = wsurgery.convert(r18, mode="aws", norm="gn", inplace=False, trace=False)
    assert converted is not r18
    _assert_same_state(_state(r18), before)
    assert _type_names(r18) == types
    fold(converted)  # folding a copy must not break the converted model (shared parametrized class)
    assert parametrize.is_parametrized(converted.conv1)
    converted(_x(1))


# -------------------------------------------------------------------------------------- report


def test_report_types_params_and_include_exclude():
    model = _timm("efficientnet_b0")
    n_params = sum(p.numel() for p in model.parameters())
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    converted, report = wsurgery.convert(model, mode="aws", norm="gn", exclude=["conv_head"], inplace=False)
    assert report.params_before == n_params
    assert report.params_after == sum(p.numel() for p in converted.parameters())
    extra = sum(2 * m.out_channels for n, m in convs.items() if n != "conv_head")
    assert report.params_after == n_params + extra  # gain+shift per filter; GN affine = BN affine
    by_name = {c.name: c for c in report.changes}
    assert by_name["conv_stem"].old_type == "Conv2d"
    assert by_name["conv_stem"].new_type == "Conv2d+AdaptiveWeightStandardization"
    assert by_name["conv_stem"].params_after == by_name["conv_stem"].params_before + 2 * 32
    assert by_name["bn1"].old_type == "BatchNormAct2d" and by_name["bn1"].new_type == "GroupNormAct"
    assert report.skipped == ["conv_head"] and "conv_head" not in by_name
    assert not parametrize.is_parametrized(converted.conv_head)
    assert report.num_convs == len(convs) - 1
    # SE convs feed an activation, not a norm; every other conv feeds a BN
    assert report.convs_without_norm is not None
    se = sorted(n for n in convs if n.endswith(("se.conv_reduce", "se.conv_expand")))
    assert se and sorted(report.convs_without_norm) == se
    assert report.convs_not_traced == []  # every conv of this model is seen by the trace
    data = report.to_dict()
    assert wsurgery.SurgeryReport.from_dict(json.loads(json.dumps(data))).to_dict() == data


def test_report_conv_without_norm_custom_model():
    model = nn.Sequential(
        OrderedDict(
            stem=nn.Conv2d(3, 8, 3), bn=nn.BatchNorm2d(8), act=nn.ReLU(), mid=nn.Conv2d(8, 8, 1), act2=nn.ReLU(),
            out=nn.Conv2d(8, 4, 1), gn=nn.GroupNorm(2, 4),
        )
    )
    _, report = wsurgery.convert(model, mode="ws")
    assert report.convs_without_norm == ["mid"]
    assert report.num_convs == 3 and report.num_norms == 0
    _, report = wsurgery.convert(nn.Sequential(nn.Conv2d(3, 4, 1, bias=False)), trace=False)
    assert report.convs_without_norm is None  # not traced: unknown, not "none"


def test_report_names_convs_the_trace_cannot_see():
    # timm keeps NormFreeBlock whole in a trace (its notrace registry); the convs inside it,
    # SE convs without a norm among them, are listed as not judged instead of passing silently
    model = timm.create_model("nf_regnet_b0")
    # its plain convs inside the blocks: the SE convs (the others are timm's own StdConv2d, left alone)
    inside = sorted(n for n, m in model.named_modules()
                    if type(m) is nn.Conv2d and n.startswith("stages.") and ".attn." in n)
    _, report = wsurgery.convert(model, mode="ws")
    assert len(inside) == 32 and sorted(report.convs_not_traced) == inside
    assert report.convs_without_norm == []  # every converted conv is inside the blocks: none judged


def test_zero_variance_filters_reported():
    conv = nn.Conv2d(2, 4, 3)
    with torch.no_grad():
        conv.weight[2] = 0.5
    _, report = wsurgery.convert(nn.Sequential(conv), trace=False)
    assert report.zero_variance_filters == {"0": 1}
    assert "1 zero-variance" in report.changes[0].note


# ------------------------------------------------------------------------------- timm's own WS


def _independent_timm_ws(m: nn.Conv2d) -> torch.Tensor:
    w = m.weight.double()
    flat = w.reshape(w.shape[0], -1)
    mean = flat.mean(1, keepdim=True)
    var = ((flat - mean) ** 2).mean(1, keepdim=True)
    out = (flat - mean) / torch.sqrt(var + m.eps)
    if hasattr(m, "gain"):
        out = out * m.gain.double().reshape(-1, 1) * m.scale
    return out.reshape_as(w)


def test_timm_ws_convs_recognised_left_alone_and_folded():
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            a=StdConv2d(3, 8, 3, eps=1e-8),
            b=StdConv2dSame(8, 8, 3, stride=2, eps=1e-6),
            c=ScaledStdConv2d(8, 8, 3, padding=1, gamma=1.7),
            d=ScaledStdConv2dSame(8, 8, 3, stride=2, gamma=0.9, eps=1e-5),
            e=nn.Conv2d(8, 4, 1),
        )
    )
    randomize_norms(model)  # random gains
    with torch.no_grad():
        model.c.gain.mul_(torch.linspace(0.5, 2, 8).view(-1, 1, 1, 1))
    x = torch.randn(2, 3, 23, 23)
    with torch.no_grad():
        ref = model(x)
    converted, report = wsurgery.convert(model, mode="ws", inplace=False)
    assert report.already_standardized == ["a", "b", "c", "d"]
    assert [c.name for c in report.changes] == ["e"]
    for n, cls in zip("abcd", (StdConv2d, StdConv2dSame, ScaledStdConv2d, ScaledStdConv2dSame)):
        assert type(converted.get_submodule(n)) is cls
    folded = fold(model)
    assert_no_standardization(folded, "timm WS fold")
    assert [type(folded.get_submodule(n)) for n in "abcde"] == [nn.Conv2d, Conv2dSame, nn.Conv2d, Conv2dSame, nn.Conv2d]
    for n in "abcd":
        assert_close(folded.get_submodule(n).weight.double(), _independent_timm_ws(model.get_submodule(n)),
                     rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        assert_rel_close(folded(x), ref, 1e-5, "timm WS fold")


def test_load_of_a_directory_refuses_arguments_it_would_ignore(tmp_path):
    from wsurgery.errors import UsageError

    model, _ = wsurgery.convert(timm.create_model("test_efficientnet", num_classes=3), mode="aws")
    wsurgery.save(model, tmp_path / "s")
    for kwargs, said in (({"model_args": {"drop_rate": 0.5}}, "model_args does"),
                         ({"pretrained": True}, r"pretrained \(--pretrained\) does"),
                         ({"remap_by_order": True, "pretrained": True},
                          r"pretrained \(--pretrained\) and remap_by_order \(--remap-by-order\) do")):
        with pytest.raises(UsageError, match=f"saved directory.*; {said} not apply"):
            wsurgery.load(tmp_path / "s", **kwargs)
    # what changes nothing is accepted: the same model comes back
    loaded = wsurgery.load(tmp_path / "s", pretrained=False, model_args={})
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)


@pytest.mark.parametrize("call, fragment", [
    (lambda: wsurgery.convert(torch.zeros(3)), "model must be a torch.nn.Module"),
    (lambda: wsurgery.fold(None), "got NoneType"),
    (lambda: wsurgery.export("resnet18", "unused"), "got str; load it first: wsurgery.load"),
    (lambda: wsurgery.save({}, "unused"), "got dict"),
    (lambda: wsurgery.SurgeryConfig(gn_groups="8"), "`gn_groups` must be an integer, got '8' (str)"),
    (lambda: wsurgery.SurgeryConfig(gn_eps="1e-5"), "`gn_eps` must be a number"),
    (lambda: wsurgery.load("resnet18", pretrained=False, num_classes="3"), "`num_classes` must be an integer"),
    (lambda: wsurgery.load(timm.create_model("resnet18")), "load takes a timm name"),
    (lambda: wsurgery.data.find_images([torch.zeros(3, 8, 8)]), "images are named by file paths"),
])
def test_wrong_argument_types_are_one_line_type_errors(call, fragment, tmp_path, monkeypatch):
    """A wrong type is an ArgumentTypeError (a WSurgeryError and a TypeError) that says what to pass."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(wsurgery.errors.ArgumentTypeError) as caught:
        call()
    assert isinstance(caught.value, TypeError) and isinstance(caught.value, wsurgery.WSurgeryError)
    assert fragment in str(caught.value) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_an_unknown_device_is_refused_before_loading():
    with pytest.raises(wsurgery.errors.UsageError, match="`device` 'gpu' is not a device torch knows"):
        wsurgery.load("resnet18", pretrained=False, device="gpu")
