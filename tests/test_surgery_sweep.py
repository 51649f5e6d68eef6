"""Table-driven surgery checks over timm's CNN zoo (issue 2, part 10).

For every architecture (smallest variant of its family, random init, randomized BN):

* ``aws`` conversion with BN kept computes what the original did (relative 1e-5);
* fold equals the unfolded model for ``ws`` and ``aws``, with BN kept and with ``norm=gn``,
  and leaves no parametrization, no timm ``StdConv2d`` and no standardization module behind;
* the export reloads (stock ``timm.create_model('local-dir:...')`` where the export says it
  is timm-compatible, ``wsurgery.load`` otherwise) and matches the unfolded model.

Models that already standardize their weights (BiT ``StdConv2d``, NFNet ``ScaledStdConv2d``)
are checked fold-only: ``convert`` leaves their WS convs alone, ``fold`` removes them.

The fast subset runs by default; the rest is marked ``sweep`` (``pytest --sweep``, CI).
"""

from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest
import timm
import torch
from _core_helpers import assert_no_standardization, assert_rel_close, module_types, randomize_norms
from torch.nn.utils import parametrize

import wsurgery
from wsurgery.convert import TIMM_WS_TYPES, ws_parametrizations
from wsurgery.fold import fold
from wsurgery.norm import is_batchnorm


@dataclass(frozen=True)
class Arch:
    name: str
    family: str
    size: int = 64
    kind: str = "convert"  # convert | fold_only (already WS) | no_bn (WS only, nothing for gn to replace)
    kwargs: tuple[tuple[str, object], ...] = ()  # timm constructor args (recorded in the export)


#: the architectures tested; the README lists this table
ARCHS: list[Arch] = [
    Arch("resnet18", "resnet"),
    Arch("resnet18d", "resnet-D (deep stem, avg-pool shortcut)"),
    Arch("resnext26ts", "resnext (byobnet, grouped convs)"),
    Arch("seresnext26d_32x4d", "seresnext (SE, grouped convs)"),
    Arch("regnetx_002", "regnet"),
    Arch("efficientnet_b0", "efficientnet"),
    Arch("tf_efficientnet_lite0", "tf_efficientnet (Conv2dSame, TF padding)"),
    Arch("efficientnet_cc_b0_4e", "efficientnet CondConv (expert banks)"),
    Arch("mobilenetv2_050", "mobilenetv2"),
    Arch("mobilenetv3_small_050", "mobilenetv3 (hard-swish, SE)"),
    Arch("mixnet_s", "mixnet (MixedConv2d)"),
    Arch("densenet121", "densenet (BatchNormAct2d pre-activation)"),
    # mlp_ratio shrinks the 7x7 conv head from 103M to 13M weights (the sweep's time budget); it
    # is a timm constructor arg, so the export must record it for stock timm to rebuild the model
    Arch("vgg11_bn", "vgg_bn (conv MLP head, mlp_ratio=0.125)", kwargs=(("mlp_ratio", 0.125),)),
    Arch("dla34", "dla"),
    Arch("dpn48b", "dpn (BatchNormAct2d, grouped)"),
    Arch("ghostnet_050", "ghostnet"),
    Arch("hrnet_w18_small", "hrnet"),
    Arch("cspresnet50", "cspnet"),
    Arch("darknet17", "darknet"),
    Arch("rexnet_100", "rexnet"),
    Arch("res2net50_14w_8s", "res2net"),
    Arch("selecsls42b", "selecsls"),
    Arch("skresnet18", "skresnet (selective kernel)"),
    Arch("ese_vovnet19b_slim_dw", "vovnet"),
    Arch("xception41", "xception (aligned)"),
    Arch("inception_v3", "inception", size=75),
    Arch("convnext_atto", "convnext (LayerNorm, no BN: WS only)", kind="no_bn"),
    Arch("resnetv2_50x1_bit", "resnetv2 BiT (StdConv2d + GN: fold only)", kind="fold_only"),
    Arch("nf_regnet_b0", "nfnet (ScaledStdConv2d: fold only)", kind="fold_only"),
    Arch("resnest14d", "resnest (split attention)"),
    Arch("gernet_s", "byobnet / gernet"),
    Arch("lcnet_050", "lcnet"),
    Arch("hgnetv2_b0", "hgnet"),
    Arch("repvgg_a0", "repvgg (byobnet, multi-branch)"),
]

FAST = {"resnet18", "tf_efficientnet_lite0", "mixnet_s", "nf_regnet_b0"}


README = Path(__file__).resolve().parent.parent / "README.md"
# None: not exported that way (README writes an en dash, fold-only rows)
LOADERS = {"stock timm": True, "wsurgery.load": False, "\u2013": None}


@cache
def readme_table() -> dict[str, dict[str, object]]:
    """README's "Architectures tested" table: per architecture, whether its BN-kept, its ``--norm gn`` (32
    groups) and its one-group ``--norm gn --gn-groups 1`` exports load with stock timm (True), only with
    wsurgery.load (False), or are not made (None), and
    whether the row is marked * (runs in the fast test run)."""
    text = README.read_text(encoding="utf-8")
    section = text.split("## Architectures tested", 1)[1].split("\n#", 1)[0]
    rows = {}
    for line in section.splitlines():
        m = re.match(r"\| `([^`]+)`([^|]*)\|[^|]*\|([^|]+)\|([^|]+)\|([^|]+)\|\s*$", line)
        if not m:
            continue
        name, marks, keep, gn, gn1 = m.group(1), m.group(2), *(m.group(i).strip() for i in (3, 4, 5))

        def loader(cell: str, name=name) -> bool | None:
            found = [v for k, v in LOADERS.items() if cell == k or cell.startswith(k + " ")]
            assert len(found) == 1, f"README row {name}: cannot read {cell!r}"
            return found[0]

        rows[name] = {"keep": loader(keep), "gn": loader(gn), "gn1": loader(gn1), "fast": "*" in marks}
    return rows


def _params():
    for a in ARCHS:
        marks = [] if a.name in FAST else [pytest.mark.sweep]
        yield pytest.param(a, id=a.name, marks=marks)


def _make(arch: Arch) -> tuple[torch.nn.Module, torch.Tensor]:
    model = timm.create_model(arch.name, pretrained=False, **dict(arch.kwargs))
    randomize_norms(model)
    model.eval()
    x = torch.randn(2, 3, arch.size, arch.size, generator=torch.Generator().manual_seed(1))
    return model, x


def _batchnorms_use_batch_stats(model: torch.nn.Module) -> None:
    for m in model.modules():
        if is_batchnorm(m):
            m.train()
            m.momentum = 0.0  # batch statistics, running ones untouched


@torch.no_grad()
def _check_export(model, x, ref, tmp_path, tag: str, fold_bn: bool = False) -> bool:
    out_dir = tmp_path / f"export-{tag}"
    result = wsurgery.export(model, out_dir, fold_bn=fold_bn)
    if result.timm_compatible:
        reloaded = timm.create_model(f"local-dir:{out_dir}", pretrained=True)
    else:
        reloaded = wsurgery.load(out_dir)
    reloaded.eval()
    assert_no_standardization(reloaded, f"{tag} reloaded export")
    assert_rel_close(reloaded(x), ref, 1e-5, f"{tag} reloaded export vs unfolded")
    del reloaded
    shutil.rmtree(out_dir)  # checked: the sweep's exports took ~3 GB of /tmp (a failed check keeps its own)
    return result.timm_compatible


def _check_fold_only(arch: Arch, model, x, tmp_path) -> None:
    ref = model(x)
    ws_modules = {n: m for n, m in model.named_modules() if isinstance(m, TIMM_WS_TYPES)}
    assert ws_modules, f"{arch.name} was expected to use timm's own WS convs"
    converted, report = wsurgery.convert(model, inplace=False)
    assert set(report.already_standardized) == set(ws_modules)
    conv_types = module_types(converted)
    for name, m in ws_modules.items():
        assert conv_types[name] is type(m), f"convert changed timm WS conv {name}"
        assert not parametrize.is_parametrized(converted.get_submodule(name))
    folded = fold(model)
    assert_no_standardization(folded, f"{arch.name} fold")
    assert_rel_close(folded(x), ref, 1e-5, f"{arch.name} fold vs timm WS")
    assert all(isinstance(model.get_submodule(n), TIMM_WS_TYPES) for n in ws_modules)  # original untouched
    compatible = _check_export(model, x, ref, tmp_path, "fold_only")
    loader = "stock timm" if compatible else "wsurgery.load"
    assert compatible is readme_table()[arch.name]["keep"], f"{arch.name}: the folded export loads with {loader}, " \
        "not as README says"


@torch.no_grad()
def _check_convert(arch: Arch, model, x, tmp_path) -> None:
    ref = model(x)
    original_types = module_types(model)
    n_convs = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    n_bn = sum(1 for m in model.modules() if is_batchnorm(m))
    if arch.kind == "no_bn":
        assert n_bn == 0
    else:
        assert n_bn > 0, f"{arch.name}: no BatchNorm found"
    for mode in ("aws", "ws"):
        for norm in ("keep", "gn"):
            tag = f"{arch.name}/{mode}/{norm}"
            converted, report = wsurgery.convert(model, mode=mode, norm=norm, inplace=False, trace=False)
            n_ws = sum(1 for _ in ws_parametrizations(converted))
            assert n_ws == report.num_convs > 0
            assert n_ws >= n_convs - len(report.already_standardized)
            if norm == "gn":
                assert report.num_norms == n_bn
                assert not any(is_batchnorm(m) for m in converted.modules())
            if mode == "ws" and norm == "keep":
                # plain WS rescales every filter to unit variance; BN's stale running statistics
                # then let activations blow up in deep nets (densenet: inf) until calibrated. Let
                # the BNs normalize with batch statistics so fold is compared on finite outputs.
                _batchnorms_use_batch_stats(converted)
            y = converted(x)
            if mode == "aws" and norm == "keep":
                assert_rel_close(y, ref, 1e-5, f"{tag} aws vs original")
            folded = fold(converted)
            assert_no_standardization(folded, f"{tag} fold")
            if norm == "keep":
                assert module_types(folded) == original_types, f"{tag}: fold did not restore module types"
            assert_rel_close(folded(x), y, 1e-5, f"{tag} fold vs unfolded")
            assert torch.equal(converted(x), y), f"{tag}: fold changed the unfolded model"
            if (mode, norm) in (("aws", "keep"), ("ws", "gn")):
                compatible = _check_export(converted, x, y, tmp_path, f"{mode}-{norm}")
                # README's "Export loads with" column for this architecture and norm
                assert compatible is readme_table()[arch.name][norm], \
                    f"{tag}: export loads with {'stock timm' if compatible else 'wsurgery.load'}, not as README says"
    if arch.kind != "no_bn":  # one group: timm's GroupNorm1 classes, norm_layer='groupnorm1' in stock timm
        one = wsurgery.convert(model, mode="ws", norm="gn", gn_groups=1, inplace=False, trace=False)[0]
        assert {m.num_groups for m in one.modules() if isinstance(m, torch.nn.GroupNorm)} == {1}
        compatible = _check_export(one, x, one(x), tmp_path, "ws-gn1")
        loader = "stock timm" if compatible else "wsurgery.load"
        assert compatible is readme_table()[arch.name]["gn1"], f"{arch.name}/ws/gn1: export loads with {loader}, " \
            "not as README says"


@pytest.mark.parametrize("arch", list(_params()))
def test_architecture(arch: Arch, tmp_path):
    model, x = _make(arch)
    if arch.kind == "fold_only":
        _check_fold_only(arch, model, x, tmp_path)
    else:
        _check_convert(arch, model, x, tmp_path)


def test_readme_table_lists_the_sweep():
    """README's table has one row per architecture swept, * on the fast ones, and a loader for each export made."""
    table = readme_table()
    assert list(table) == [a.name for a in ARCHS]
    assert {n for n, row in table.items() if row["fast"]} == FAST
    for a in ARCHS:
        assert table[a.name]["keep"] is not None, a.name
        assert (table[a.name]["gn"] is None) == (table[a.name]["gn1"] is None) == (a.kind == "fold_only"), a.name


def test_table_covers_the_required_families():
    """The issue names these families; each must be in the table (and at least 30 in all)."""
    names = {a.name for a in ARCHS}
    assert len(names) == len(ARCHS) >= 30
    required = ["resnet", "resnext", "seresnext", "regnet", "efficientnet", "tf_efficientnet", "mobilenetv2",
                "mobilenetv3", "mixnet", "densenet", "vgg", "dla", "dpn", "ghostnet", "hrnet", "csp", "darknet",
                "rexnet", "res2net", "selecsls", "skresnet", "vovnet", "xception", "inception", "convnext",
                "resnetv2", "nf_", "_cc_"]
    for prefix in required:
        assert any(prefix in n for n in names), f"no {prefix} architecture in the sweep"
    assert any(n.endswith("d") and n.startswith("resnet") for n in names)  # resnet-D
    for a in ARCHS:
        assert timm.is_model(a.name), a.name
