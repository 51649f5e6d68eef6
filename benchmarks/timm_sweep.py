"""Sweep timm CNN families through wsurgery convert/fold/export/load (the README's "Architectures
tested": 173 models beyond tests/test_surgery_sweep.py, one per family or variant type).

usage (about 40 minutes on one thread):
    OMP_NUM_THREADS=1 python benchmarks/timm_sweep.py sweep.jsonl $(cat benchmarks/timm_sweep_models.txt)
Appends one JSON line per model (a "start" line first, so a crash is attributable). Per model, random
init with randomized BatchNorm: aws + BN kept against the original, ws + gn converts and runs, both
folds against the unfolded models, the aws export (verify=True) reloaded with wsurgery.load and, where
timm_compatible, stock timm's local-dir: loader. Written for a one-off review, kept so its numbers can
be reproduced.
"""
import json
import shutil
import signal
import sys
import tempfile
import time
import traceback

import timm
import torch

import wsurgery
from wsurgery.fold import fold

torch.set_num_threads(1)
TOL = 1e-4
LIMIT = 60


class Timeout(Exception):
    pass


def _alarm(*_):
    raise Timeout(f"> {LIMIT}s")


signal.signal(signal.SIGALRM, _alarm)


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._NormBase) or type(m).__name__ in (
                    "FrozenBatchNorm2d", "FrozenBatchNormAct2d"):
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=g) * 0.1)
                    m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) * 1.5 + 0.5)
                if getattr(m, "weight", None) is not None:
                    m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.1)
    return model


def out_tensor(y):
    if isinstance(y, (tuple, list)):
        y = y[0]
    if isinstance(y, dict):
        y = next(iter(y.values()))
    return y


def rel(a, b):
    a, b = out_tensor(a).float(), out_tensor(b).float()
    if a.shape != b.shape:
        return float("inf")
    scale = b.abs().max().item() or 1.0
    return (a - b).abs().max().item() / scale


def check(rec, key, value, label):
    """Record the relative difference ``value`` as ``rec[key]``; above TOL it is a failure named ``label``."""
    rec[key] = value
    if not value <= TOL:
        rec.setdefault("fails", []).append(f"{label} rel={value:.3g}")


def folded_rel(model, x, y):
    """Relative difference between the fold of ``model`` and ``y`` (``model``'s own output on ``x``)."""
    with torch.no_grad():
        return rel(fold(model).eval()(x), y)


def make(name, **kw):
    return timm.create_model(name, pretrained=False, num_classes=10, **kw)


def pick_size(model, name):
    cfg = model.pretrained_cfg or {}
    default = tuple(cfg.get("input_size", (3, 224, 224)))[1:]
    if cfg.get("fixed_input_size"):
        return [default[0]]
    sizes = [64, 96, 128, 160, 224]
    if default[0] < 224:
        sizes = [s for s in sizes if s <= default[0]] or [default[0]]
    elif default[0] > 224:
        sizes.append(default[0])  # some need a multiple of their window (halonet: 256)
    return sizes


def run(name):
    rec = {"model": name}
    step = "create"
    t0 = time.time()
    signal.alarm(LIMIT)
    tmp = tempfile.mkdtemp(prefix="wsurgery-sweep-")  # the system temp folder
    try:
        model = make(name)
        rec["params"] = sum(p.numel() for p in model.parameters())
        randomize(model)
        model.eval()
        step = "original_forward"
        x = ref = None
        errs = []
        for s in pick_size(model, name):
            x = torch.randn(2, 3, s, s, generator=torch.Generator().manual_seed(1))
            try:
                with torch.no_grad():
                    ref = model(x)
                rec["size"] = s
                break
            except Exception as e:  # noqa
                errs.append(f"{s}: {type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}")
        if ref is None:
            raise RuntimeError("no input size works: " + "; ".join(errs))
        if not torch.isfinite(out_tensor(ref)).all():
            rec["note_orig_nonfinite"] = True
        # --- aws + keep
        step = "convert_aws_keep"
        aws, rep = wsurgery.convert(model, mode="aws", norm="keep", inplace=False)
        rec["aws_convs"] = rep.num_convs
        rec["already_std"] = len(rep.already_standardized)
        rec["other_convs"] = rep.other_convs
        step = "aws_forward"
        aws.eval()
        with torch.no_grad():
            y = aws(x)
        check(rec, "aws_rel", rel(y, ref), "aws_equal")
        step = "fold_aws"
        check(rec, "fold_aws_rel", folded_rel(aws, x, y), "fold_aws")
        # --- export aws + keep
        step = "export_aws"
        d = f"{tmp}/aws"
        res = wsurgery.export(aws, d, verify=True)
        rec["timm_compatible"] = res.timm_compatible
        v = res.verification
        rec["export_verify"] = None if v is None else (v.passed, float(v.max_rel))
        if v is not None and not v.passed:
            rec.setdefault("fails", []).append(f"export_verify max_rel={v.max_rel:.3g}")
        step = "wsurgery_load_aws"
        m2 = wsurgery.load(d).eval()
        with torch.no_grad():
            check(rec, "load_rel", rel(m2(x), y), "wsurgery.load")
        del m2
        if res.timm_compatible:
            step = "timm_local_dir_aws"
            m3 = timm.create_model("local-dir:" + d, pretrained=True).eval()
            with torch.no_grad():
                check(rec, "timm_rel", rel(m3(x), y), "timm local-dir")
            del m3
        del aws
        # --- ws + gn
        step = "convert_ws_gn"
        ws, rep = wsurgery.convert(model, mode="ws", norm="gn", inplace=False)
        rec["gn_norms"] = rep.num_norms
        step = "ws_gn_forward"
        ws.eval()
        with torch.no_grad():
            y = ws(x)
        if not torch.isfinite(out_tensor(y)).all():
            rec.setdefault("fails", []).append("ws_gn nonfinite")
        step = "fold_ws_gn"
        check(rec, "fold_gn_rel", folded_rel(ws, x, y), "fold_ws_gn")
        # --- extra: export ws + gn, reload
        step = "export_ws_gn"
        d = f"{tmp}/gn"
        res = wsurgery.export(ws, d, verify=True)
        rec["gn_timm_compatible"] = res.timm_compatible
        v = res.verification
        if v is not None and not v.passed:
            rec.setdefault("fails", []).append(f"gn export_verify max_rel={v.max_rel:.3g}")
        step = "reload_ws_gn"
        m2 = (timm.create_model("local-dir:" + d, pretrained=True) if res.timm_compatible else wsurgery.load(d)).eval()
        with torch.no_grad():
            check(rec, "gn_load_rel", rel(m2(x), y), "gn reload")
        rec["status"] = "fail" if rec.get("fails") else "pass"
    except Exception as e:  # noqa
        rec["status"] = "timeout" if isinstance(e, Timeout) else "error"
        rec["step"] = step
        rec["exc"] = type(e).__name__
        rec["msg"] = (str(e).strip().splitlines() or [""])[0][:300]
        tb = traceback.extract_tb(e.__traceback__)
        rec["where"] = [f"{fr.filename.split('site-packages/')[-1].replace('/work/main/', '')}:{fr.lineno}:{fr.name}"
                        for fr in tb[-4:]]
    finally:
        signal.alarm(0)
        shutil.rmtree(tmp, ignore_errors=True)
    rec["secs"] = round(time.time() - t0, 1)
    return rec


if __name__ == "__main__":
    out = sys.argv[1]
    for name in sys.argv[2:]:
        with open(out, "a") as fh:
            fh.write(json.dumps({"start": name}) + "\n")
        rec = run(name)
        with open(out, "a") as fh:
            fh.write(json.dumps(rec) + "\n")
        print(json.dumps({k: rec.get(k) for k in ("model", "status", "step", "exc", "msg", "fails", "secs")}),
              flush=True)
