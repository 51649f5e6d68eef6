"""The Python API on unusual but valid models: wrapped, frozen, mixed train/eval flags, other
parametrizations, timm entrypoints that build differently when pretrained."""

from __future__ import annotations

import sys

import pytest
import timm
import torch
from _core_helpers import randomize_norms
from safetensors.torch import save_file
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm

import wsurgery
from wsurgery.errors import ConversionError, UsageError
from wsurgery.train import evaluate

X = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def _outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(X)


# --- a timm entrypoint whose BatchNorm eps depends on `pretrained` ------------------------------------------


def test_fbnetc_export_loads_in_stock_timm_with_the_eps_it_was_built_with(tmp_path):
    """timm's fbnetc_100 sets bn_eps=1e-3 only with pretrained=True, which is how stock timm loads an
    export (local-dir:): a model built with eps 1e-5 came back with 1e-3, all outputs off, while the
    export said timm_compatible."""
    model = timm.create_model("fbnetc_100", num_classes=7)
    wsurgery.convert(model, mode="aws")
    result = wsurgery.export(model, tmp_path / "e")
    assert result.timm_compatible and result.model_args["bn_eps"] == 1e-5
    stock = timm.create_model(f"local-dir:{tmp_path / 'e'}", pretrained=True)
    assert stock.bn1.eps == 1e-5
    torch.testing.assert_close(_outputs(stock), _outputs(wsurgery.fold(model)), rtol=0, atol=0)


def test_one_group_export_loads_in_stock_timm(tmp_path):
    """One GN group converts to timm's GroupNorm1, so the export names norm_layer='groupnorm1' and stock
    timm rebuilds it (it could not with 'groupnorm': timm's 32 groups); mixed groups stay wsurgery.load's."""
    model = timm.create_model("resnet10t", num_classes=7)
    randomize_norms(model)
    converted = wsurgery.convert(model, mode="aws", norm="gn", gn_groups=1, inplace=False)[0]
    result = wsurgery.export(converted, tmp_path / "one")
    assert result.timm_compatible and result.model_args["norm_layer"] == "groupnorm1"
    stock = timm.create_model(f"local-dir:{tmp_path / 'one'}", pretrained=True)
    assert {m.num_groups for m in stock.modules() if isinstance(m, nn.GroupNorm)} == {1}
    torch.testing.assert_close(_outputs(stock), _outputs(wsurgery.fold(converted)), rtol=0, atol=0)
    # resnet10t's stem has 24 and 32 channels: with 8 channels a group they get 3 and 4 groups, the rest more
    mixed = wsurgery.convert(model, mode="aws", norm="gn", gn_group_size=8, inplace=False)[0]
    assert not wsurgery.export(mixed, tmp_path / "mixed").timm_compatible


def test_fbnetc_built_pretrained_saves_and_loads_with_its_eps(tmp_path):
    """Built pretrained (eps 1e-3; weights from a local file, as timm does online), save -> load rebuilt it
    with pretrained=False (eps 1e-5) and nothing said so."""
    save_file(timm.create_model("fbnetc_100").state_dict(), tmp_path / "w.safetensors")
    model = timm.create_model("fbnetc_100", pretrained=True,
                              pretrained_cfg_overlay={"file": str(tmp_path / "w.safetensors")})
    assert model.bn1.eps == 1e-3
    wsurgery.convert(model, mode="aws")
    wsurgery.save(model, tmp_path / "s")
    loaded = wsurgery.load(tmp_path / "s")
    assert {m.eps for m in loaded.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}
    torch.testing.assert_close(_outputs(loaded), _outputs(model), rtol=0, atol=0)


def test_save_refuses_a_norm_eps_the_record_cannot_rebuild(tmp_path):
    model = timm.create_model("resnet10t", num_classes=3)
    wsurgery.convert(model, mode="aws")
    model.bn1.eps = 0.1  # changed by hand after it was built: load would rebuild 1e-5
    with pytest.raises(ConversionError, match=r"'bn1' is .*\(0\.1,\)"):
        wsurgery.save(model, tmp_path / "s")
    assert not (tmp_path / "s").exists()


# --- wrappers -------------------------------------------------------------------------------------------------


def test_convert_and_fold_look_through_dataparallel(tmp_path):
    """The surgery record went onto the DataParallel wrapper, so save/export (which unwrap) refused; the
    report's names had a `module.` prefix and include patterns without it matched nothing."""
    inner = timm.create_model("resnet10t", num_classes=3)
    reference = _outputs(inner)
    wrapped = nn.DataParallel(inner)
    inner.cpu()  # DataParallel moves its module to the GPU where there is one; this test runs on the CPU
    out, report = wsurgery.convert(wrapped, mode="aws", norm="keep", include=["layer1.*"])
    assert out is wrapped and wsurgery.is_converted(inner)
    assert {c.name for c in report.changes} == {n for n, m in inner.named_modules()
                                                if n.startswith("layer1.") and isinstance(m, nn.Conv2d)}
    wsurgery.save(wrapped, tmp_path / "s")
    torch.testing.assert_close(_outputs(wsurgery.load(tmp_path / "s")), reference)
    folded = wsurgery.fold(wrapped, fold_bn=True, inplace=True)
    assert folded is wrapped and not wsurgery.is_converted(inner) and inner.wsurgery_folded_bn
    torch.testing.assert_close(_outputs(inner), reference, rtol=1e-4, atol=1e-4)


def test_convert_copy_of_a_wrapped_model_is_the_model_inside():
    inner = timm.create_model("resnet10t", num_classes=3)
    copy, report = wsurgery.convert(nn.DataParallel(inner), mode="ws", inplace=False)
    assert not isinstance(copy, nn.DataParallel) and wsurgery.is_converted(copy)
    assert not wsurgery.is_converted(inner) and not report.changes[0].name.startswith("module.")


# --- the caller's train/eval flags and requires_grad ------------------------------------------------------------


def _mixed_modes(model: nn.Module) -> dict[str, bool]:
    model.train()
    model.layer4.eval()  # e.g. a stage whose dropout/drop-path the caller switched off
    return {n: m.training for n, m in model.named_modules()}


def test_every_submodule_keeps_its_own_mode(tmp_path):
    """convert(norm='gn')'s probe, export's verification and evaluate() set every submodule to the top
    module's mode afterwards (model.train(was_training)), switching layer4 back to training."""
    model = timm.create_model("resnet10t", num_classes=3, drop_path_rate=0.5)
    modes = _mixed_modes(model)
    wsurgery.convert(model, mode="aws", norm="gn", trace=False)
    def now() -> dict[str, bool]:  # the modules there were (GNs in their BN's place), not the parametrizations
        found = dict(model.named_modules())
        return {n: found[n].training for n in modes}

    assert now() == modes  # each GN took its BN's mode
    wsurgery.export(model, tmp_path / "e", verify=True)
    assert now() == modes
    data = torch.utils.data.TensorDataset(X, torch.tensor([0, 1]))
    evaluate(model, data, batch_size=2)
    assert now() == modes


def test_a_frozen_model_stays_frozen():
    """convert(mode='aws') gave a frozen model trainable gain/shift (and BN -> GN trainable affines);
    fold(fold_bn=True) trainable conv biases."""
    model = timm.create_model("resnet10t", num_classes=3).requires_grad_(False)
    wsurgery.convert(model, mode="aws", norm="gn", trace=False)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == []
    bn_model = timm.create_model("resnet10t", num_classes=3).requires_grad_(False)
    wsurgery.convert(bn_model, mode="aws")
    folded = wsurgery.fold(bn_model, fold_bn=True)
    assert [n for n, p in folded.named_parameters() if p.requires_grad] == []
    # a trainable model keeps its new parameters trainable
    live = wsurgery.convert(timm.create_model("resnet10t", num_classes=3), mode="aws", norm="gn", trace=False)[0]
    assert all(p.requires_grad for p in live.parameters())


# --- other parametrizations -------------------------------------------------------------------------------------


def test_weight_norm_conv_is_refused_before_anything_changes():
    """WS stacked on weight_norm (two tensors) converted, then fold failed half-way (inplace: earlier convs
    already folded)."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), weight_norm(nn.Conv2d(4, 4, 3)))
    with pytest.raises(ConversionError, match=r"^2\.weight .*remove_parametrizations"):
        wsurgery.convert(model, mode="aws", trace=False)
    assert not parametrize.is_parametrized(model[0]) and not wsurgery.is_converted(model)
    # its own fix works: remove weight_norm, then convert and fold
    parametrize.remove_parametrizations(model[2], "weight")
    wsurgery.convert(model, mode="aws", trace=False)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(wsurgery.fold(model, inplace=False)(x), model(x), rtol=0, atol=0)


def test_hook_weight_norm_and_lazy_convs_are_refused_with_their_fix():
    """The old hook API (torch.nn.utils.weight_norm: weight_g/weight_v, `weight` recomputed by a
    pre-hook) gave parametrize's raw ValueError; an uninitialised LazyConv2d torch's."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch deprecates the hook API
        hooked = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), torch.nn.utils.weight_norm(nn.Conv2d(4, 4, 3)))
    with pytest.raises(ConversionError, match=r"^2\.weight is computed by a hook .*remove_weight_norm"):
        wsurgery.convert(hooked, mode="ws", trace=False)
    assert not wsurgery.is_converted(hooked)
    torch.nn.utils.remove_weight_norm(hooked[2])  # the fix the message names
    assert wsurgery.convert(hooked, mode="ws", trace=False)[1].num_convs == 2
    lazy = nn.Sequential(nn.LazyConv2d(4, 3), nn.BatchNorm2d(4))
    with pytest.raises(ConversionError, match=r"^0 is a lazy conv .*run the model once"):
        wsurgery.convert(lazy, mode="ws", trace=False)
    lazy(torch.randn(1, 3, 8, 8))
    assert wsurgery.convert(lazy, mode="aws", trace=False)[1].num_convs == 1
    # a single-tensor parametrization is no hook: it converts, stacked (as before)
    from torch.nn.utils.parametrizations import orthogonal

    stacked = nn.Sequential(orthogonal(nn.Conv2d(4, 4, 1)))
    assert wsurgery.convert(stacked, mode="ws", trace=False)[1].num_convs == 1


def test_convolutions_of_other_kinds_are_listed_not_silently_passed_over():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ConvTranspose2d(4, 4, 2), nn.Conv1d(4, 4, 1))
    _, report = wsurgery.convert(model, mode="ws", trace=False)
    assert [c.name for c in report.changes] == ["0"] and report.other_convs == ["1", "2"]
    assert wsurgery.convert(timm.create_model("resnet10t"), mode="ws", trace=False)[1].other_convs == []


def test_frozen_batchnorm_becomes_a_trainable_groupnorm():
    """FrozenBatchNorm2d (timm's freeze_batch_norm_2d) holds its affine as buffers (no grad): the
    GroupNorm replacing it is trainable, as the same model loaded from disk is (only a BN frozen with
    requires_grad_ stays frozen)."""
    from torchvision.ops.misc import FrozenBatchNorm2d  # what timm.layers.freeze_batch_norm_2d makes

    model = nn.Sequential(nn.Conv2d(3, 8, 3), FrozenBatchNorm2d(8))
    wsurgery.convert(model, mode="ws", norm="gn", gn_groups=2, trace=False, probe=False)
    assert isinstance(model[1], nn.GroupNorm) and model[1].weight.requires_grad and model[1].bias.requires_grad


# --- what the docstrings say, from a review of them against the code ------------------------------------------


def test_calibrate_takes_the_method_from_its_config():
    """calibrate(config=CalibrationConfig(method="bn-stats")) ran `auto` (bn-stats + distill): the
    method argument's default overwrote the config's."""
    from test_calibrate import _images, make_teacher

    from wsurgery.calibrate import CalibrationConfig

    teacher = make_teacher()
    student, _ = wsurgery.convert(teacher, mode="ws", inplace=False)
    result = wsurgery.calibrate(student, teacher, _images(16), config=CalibrationConfig(method="bn-stats", steps=1),
                                held_out=None)
    assert result.phases == ["bn-stats"]
    # an explicit method still wins over the config's
    result = wsurgery.calibrate(student, teacher, _images(16), method="distill",
                                config=CalibrationConfig(method="bn-stats", steps=1), held_out=None)
    assert result.phases == ["distill"]


def test_misspelled_settings_are_config_errors_naming_them():
    from wsurgery.errors import ConfigError

    model = timm.create_model("resnet10t")
    with pytest.raises(ConfigError, match=r"unknown surgery setting 'nrm'; the settings are mode, convention"):
        wsurgery.convert(model, nrm="gn")
    assert not wsurgery.is_converted(model)
    from test_calibrate import _images, make_teacher

    teacher = make_teacher()
    student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", inplace=False)
    with pytest.raises(ConfigError, match=r"unknown calibration setting 'step'; the settings are method"):
        wsurgery.calibrate(student, teacher, _images(8), step=3)
    import dataclasses

    from wsurgery.config import build_config_from

    @dataclasses.dataclass
    class WithDerived:
        a: int = 1
        b: int = dataclasses.field(default=2, init=False)  # not a setting: derived

    with pytest.raises(ConfigError, match=r"unknown test setting 'b'; the settings are a$"):
        build_config_from(WithDerived, {"b": 3}, "test")


def test_precondition_where_gn_init_does_not_run_is_refused():
    from test_calibrate import _images, make_teacher

    from wsurgery.errors import ConfigError

    teacher = make_teacher()
    student, _ = wsurgery.convert(teacher, mode="aws", inplace=False)  # BatchNorm kept: no gn-init
    before = {k: v.clone() for k, v in student.state_dict().items()}
    with pytest.raises(ConfigError, match=r"precondition .* is a step of gn-init, which method 'auto' does not run"
                                          r".*norm='gn'"):
        wsurgery.calibrate(student, teacher, _images(8), precondition=True, held_out=None)
    assert all(torch.equal(v, before[k]) for k, v in student.state_dict().items())
    gn_student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", gn_groups=4, inplace=False)
    with pytest.raises(ConfigError, match=r"method 'distill' does not run here \(distill\); use method 'auto' or"):
        wsurgery.calibrate(gn_student, teacher, _images(8), method="distill", precondition=True, held_out=None)
    with pytest.raises(ConfigError, match=r"anchor \(--calib-anchor\) is a step of gn-init, which method 'distill'"):
        wsurgery.calibrate(gn_student, teacher, _images(8), method="distill", anchor=True, held_out=None)
    assert not hasattr(gn_student, "wsurgery_anchored")


def test_export_takes_one_format_as_a_string(tmp_path):
    """formats="torch-export" was read letter by letter: "unknown deployment format 't'"."""
    model, _ = wsurgery.convert(timm.create_model("resnet10t", num_classes=3), mode="ws")
    result = wsurgery.export(model, tmp_path / "e", formats="torch-export", img_size=32)
    assert [d.format for d in result.deployments] == ["torch-export"] and (tmp_path / "e" / "model.pt2").is_file()


def test_load_with_remap_by_order_needs_a_checkpoint():
    with pytest.raises(UsageError, match=r"remap_by_order .* needs checkpoint"):
        wsurgery.load("resnet10t", pretrained=False, remap_by_order=True)


@pytest.mark.slow
def test_a_stem_that_rearranges_the_image_takes_rgb(tmp_path):
    """TResNet's space-to-depth stem gives its first conv 48 channels (CSATv2's DCT stem 64): verify and
    export's check fed 48-channel images (a raw RuntimeError; export said stock timm could not load
    it), and image reading refused the model as a 48-channel one. Found by a sweep of 173 timm models."""
    from wsurgery.convert import input_channels
    from wsurgery.data import eval_transform

    torch.manual_seed(0)
    model = timm.create_model("tresnet_m", num_classes=3).eval()
    assert input_channels(model) == 3 and eval_transform(model) is not None
    converted, _ = wsurgery.convert(model, mode="aws", inplace=False)
    result = wsurgery.export(converted, tmp_path / "e", verify=True)
    assert result.verification.passed and result.timm_compatible
    # and a model built with in_chans=1 still takes one channel (recorded by timm, or its first conv's)
    assert input_channels(timm.create_model("resnet10t", in_chans=1)) == 1
    bare = timm.create_model("resnet10t", in_chans=1)
    del bare._model_args
    assert input_channels(bare) == 1
    # built by the entrypoint itself (no record): the first conv's channels, 4, where there is no such stem
    assert input_channels(timm.models.resnet.resnet10t(in_chans=4)) == 4
    bare_s2d = timm.models.tresnet.tresnet_m(in_chans=1)  # space-to-depth: 16 channels, 1 before it
    assert getattr(bare_s2d, "_model_args", None) is None and input_channels(bare_s2d) == 1
    assert input_channels(sys.modules["timm.models.csatv2"].csatv2()) == 3  # the module name is shadowed
