"""The GPU paths: surgery, calibration, training (AMP, channels_last, resume), export, verify,
predict and DistributedDataParallel with NCCL, on a CUDA device.

Skipped where there is no CUDA (CI has none). ``benchmarks/gpu_check.sh`` runs this file on a
GPU machine together with the GPU benchmarks. ``WSURGERY_TEST_DEVICE=cpu`` runs the same checks
on the CPU, to check the tests themselves where no GPU is at hand (the CUDA-only assertions,
channels_last and NCCL, are then skipped).
"""

from __future__ import annotations

import copy
import itertools
import os
import signal

import pytest
import timm
import torch
import torch.distributed as dist
from _data import CLASSES, make_train_val
from test_calibrate import _images, make_teacher
from test_ddp import check_two_ranks
from torch.testing import assert_close

import wsurgery
from wsurgery.convert import clone_model
from wsurgery.errors import UsageError
from wsurgery.io import load_safetensors, read_json
from wsurgery.train import TrainingInterrupted, train
from wsurgery.verify import allow_tf32

DEVICE = torch.device(os.environ.get("WSURGERY_TEST_DEVICE", "cuda"))
ON_GPU = DEVICE.type == "cuda"
pytestmark = pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="needs CUDA")

FAST = ["img_size=32", "batch_size=4", "epochs=2", "lr=0.01", "warmup_steps=2", "workers=0", "label_smoothing=0",
        "aug_scale=[0.8, 1.0]"]


def _on_device(model: torch.nn.Module) -> bool:
    return all(t.device.type == DEVICE.type for t in itertools.chain(model.parameters(), model.buffers()))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return make_train_val(tmp_path_factory.mktemp("data"))


def tiny(mode: str = "aws") -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    model, _ = wsurgery.convert(model, mode=mode, norm="gn")
    return model


# ----------------------------------------------------------------------------- surgery


@pytest.mark.parametrize("arch,kwargs", [("test_efficientnet", {}),  # depthwise + pointwise + SE
                                         ("test_efficientnet", {"pad_type": "same"}),  # timm's Conv2dSame
                                         ("test_resnet", {}), ("test_byobnet", {})],
                         ids=["effnet", "effnet-same", "resnet", "byobnet"])
@pytest.mark.parametrize("mode", ["ws", "aws"])
def test_convert_on_the_device_equals_convert_on_the_cpu(arch, kwargs, mode):
    torch.manual_seed(0)
    base = timm.create_model(arch, pretrained=False, num_classes=5, **kwargs).eval()
    on_cpu, report_cpu = wsurgery.convert(copy.deepcopy(base), mode=mode, norm="gn")
    on_dev, report_dev = wsurgery.convert(copy.deepcopy(base).to(DEVICE), mode=mode, norm="gn")
    assert report_dev.num_convs == report_cpu.num_convs > 0
    assert report_dev.num_norms == report_cpu.num_norms > 0
    assert _on_device(on_dev)  # new parameters (AWS gain/shift, GroupNorm) were made where the model is
    x = torch.randn(2, 3, 64, 64)
    with allow_tf32(False), torch.no_grad():
        assert_close(on_dev.eval()(x.to(DEVICE)).cpu(), on_cpu.eval()(x), rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(not ON_GPU, reason="DataParallel needs CUDA")
def test_convert_and_fold_of_a_dataparallel_model_on_the_device():
    """convert/fold work on the model inside a DataParallel (the wrapper moves inputs to the GPU)."""
    torch.manual_seed(0)
    base = timm.create_model("test_efficientnet", pretrained=False, num_classes=5).eval()
    on_cpu, _ = wsurgery.convert(copy.deepcopy(base), mode="aws", norm="gn")
    wrapped = torch.nn.DataParallel(copy.deepcopy(base).to(DEVICE))
    same, report = wsurgery.convert(wrapped, mode="aws", norm="gn")
    assert same is wrapped and wsurgery.is_converted(wrapped.module) and report.num_convs > 0
    assert not any(c.name.startswith("module.") for c in report.changes)
    assert _on_device(wrapped.module)
    x = torch.randn(2, 3, 64, 64)
    with allow_tf32(False), torch.no_grad():
        expected = on_cpu.eval()(x)
        assert_close(wrapped.eval()(x.to(DEVICE)).cpu(), expected, rtol=1e-4, atol=1e-4)
        folded = wsurgery.fold(wrapped)  # a plain-conv copy of the model inside, on the device
        assert not isinstance(folded, torch.nn.DataParallel) and not wsurgery.is_converted(folded)
        assert _on_device(folded)
        assert_close(folded.eval()(x.to(DEVICE)).cpu(), expected, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------- calibration


def test_calibrate_on_the_device():
    teacher = make_teacher().to(DEVICE)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", gn_groups=4, inplace=False)
    images = _images(128, seed=5)  # on the CPU, as calibration_images reads them: moved to the models
    # test_calibrate's settings, with the augmented views (drawn on the CPU, applied on the device)
    result = wsurgery.calibrate(student, teacher, images, held_out=_images(64, seed=6), steps=60, batch_size=32,
                                lr=1e-2, seed=0, augment=True)
    assert result.phases == ["gn-init", "distill"] and result.steps == 60
    # on the CPU the KL falls 150-fold or more and top-1 ends at 97-100% (test_calibrate)
    assert result.after.kl < 0.02 * result.before.kl
    assert result.after.top1 >= 0.9 and result.after.top1 > result.before.top1
    assert _on_device(student)
    for k, v in teacher.state_dict().items():  # the teacher never changes
        assert torch.equal(v, before[k]), k
    # gn-init's moment matching is one deterministic pass: the same affines as on the CPU
    cpu_teacher = make_teacher()
    cpu_student, _ = wsurgery.convert(cpu_teacher, mode="aws", norm="gn", gn_groups=1, inplace=False)
    dev_student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", gn_groups=1, inplace=False)
    with allow_tf32(False):
        wsurgery.calibrate(cpu_student, cpu_teacher, images, method="gn-init", held_out=None, anchor=False)
        wsurgery.calibrate(dev_student, teacher, images, method="gn-init", held_out=None, anchor=False)
    for (name, a), (_, b) in zip(cpu_student.state_dict().items(), dev_student.state_dict().items()):
        assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # anchored (the default) on the device: the same layers, and as close to the teacher as on the CPU (its greedy
    # sign search may settle differently where the device rounds differently, so outputs are compared via the KL)
    held = _images(64, seed=6)
    kls = []
    for device_teacher, model in ((cpu_teacher, cpu_teacher), (teacher, teacher)):
        student, _ = wsurgery.convert(model, mode="aws", norm="gn", gn_groups=1, inplace=False)
        with allow_tf32(False):
            result = wsurgery.calibrate(student, device_teacher, images, method="gn-init", held_out=held)
        assert result.config["anchor"] is True and student.wsurgery_anchored == ["0", "3", "6"]
        kls.append(result.after.kl)
    assert kls[1] <= 1.5 * kls[0] + 1e-4, kls


def test_bn_stats_and_compare_on_the_device_equal_the_cpu():
    """bn-stats is one deterministic pass: the device gives the CPU's running statistics; compare of a
    model on the device against one on the CPU reads the images once for both."""
    cpu_teacher = make_teacher()
    images = _images(64, seed=5)
    results = []
    for device in ("cpu", DEVICE):
        teacher = copy.deepcopy(cpu_teacher).to(device)
        student, _ = wsurgery.convert(teacher, mode="ws", inplace=False)  # plain WS, BatchNorm kept
        with allow_tf32(False):
            result = wsurgery.calibrate(student, teacher, images, method="bn-stats", held_out=_images(32, seed=6))
        assert result.phases == ["bn-stats"]
        assert {t.device.type for t in student.state_dict().values()} == {torch.device(device).type}
        results.append((student, result))
    (s_cpu, r_cpu), (s_dev, r_dev) = results
    for (name, a), (_, b) in zip(s_cpu.state_dict().items(), s_dev.state_dict().items()):
        if a.is_floating_point():
            assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    assert abs(r_dev.after.kl - r_cpu.after.kl) < 1e-3 and r_dev.after.top1 == r_cpu.after.top1
    with allow_tf32(False):
        mixed = wsurgery.compare(s_dev, cpu_teacher, _images(32, seed=6))
        plain = wsurgery.compare(s_cpu, cpu_teacher, _images(32, seed=6))
    assert mixed.num_images == plain.num_images == 32 and mixed.top1 == plain.top1
    assert abs(mixed.kl - plain.kl) < 1e-3 and abs(mixed.kl - r_cpu.after.kl) < 1e-3


@pytest.mark.skipif(not ON_GPU, reason="needs two devices")
def test_calibrate_refuses_models_on_two_devices():
    teacher = make_teacher()
    student, _ = wsurgery.convert(teacher, mode="aws", norm="gn", inplace=False)
    with pytest.raises(UsageError, match="move both to one device"):
        wsurgery.calibrate(student.to(DEVICE), teacher, _images(8), held_out=None)


# ----------------------------------------------------------------------------- training


@pytest.mark.parametrize("amp,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16), ("none", torch.float32)])
def test_train_on_the_device_amp_channels_last(data, tmp_path, amp, dtype):
    model = tiny()
    seen: dict[str, set] = {"dtype": set(), "channels_last": set()}

    def hook(m, args, out):
        if not m.training:  # evaluation runs in fp32 on plain tensors
            return
        seen["dtype"].add(out.dtype)
        seen["channels_last"].add(args[0].dim() == 4 and args[0].is_contiguous(memory_format=torch.channels_last)
                                  and not args[0].is_contiguous())

    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(hook)
    out = tmp_path / "run"
    result = train(model, data, out, "cpu-quick", device=DEVICE, export=tmp_path / "export",
                   overrides=FAST + ["epochs=4", f"amp={amp}", "channels_last=true"])
    assert dtype in seen["dtype"]  # the convs really ran in that precision
    assert seen["channels_last"] == {ON_GPU}  # channels_last on CUDA (and only there)
    assert min(h["train_loss"] for h in result.history[1:]) < result.history[0]["train_loss"]
    assert max(h["top1"] for h in result.history) > 100 / len(CLASSES) + 10  # above chance (33%)
    # the run directory is written from the device and read back on the CPU
    loaded = wsurgery.load(out)
    assert all(p.device.type == "cpu" and p.dtype == torch.float32 for p in loaded.parameters())
    state = read_json(out / "last" / "train_state.json")
    assert (state["scaler"] is not None) == (amp == "fp16")
    # and the export made at the end was verified against it
    assert result.verify.passed and result.verify.max_rel < 1e-4
    assert not wsurgery.is_converted(wsurgery.load(tmp_path / "export"))  # plain convs


def test_resume_on_the_device_continues_where_it_stopped(data, tmp_path):
    overrides = FAST + ["accum_steps=2", "batch_size=2", "ema=true", "ema_decay=0.9", "amp=bf16"]
    full = train(tiny(), data, tmp_path / "full", "micro-batch", device=DEVICE, overrides=overrides)

    def stop_at_step(event):
        if event.kind == "step" and event.step == 9:  # in the middle of epoch 2
            os.kill(os.getpid(), signal.SIGTERM)

    with pytest.raises(TrainingInterrupted, match="--resume"):
        train(tiny(), data, tmp_path / "cut", "micro-batch", device=DEVICE, overrides=overrides,
              callback=stop_at_step)
    resumed = train(None, None, None, resume=tmp_path / "cut", device=DEVICE)
    assert resumed.steps == full.steps
    # cuDNN's backward kernels may sum in another order run to run: equal to rounding, not bit for bit
    a = load_safetensors(tmp_path / "full" / "last" / "model.safetensors")
    b = load_safetensors(tmp_path / "cut" / "last" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_close(b[k], a[k], rtol=1e-3, atol=1e-4, msg=lambda m, k=k: f"{k}: {m}")
    assert_close(torch.tensor([h["train_loss"] for h in resumed.history]),
                 torch.tensor([h["train_loss"] for h in full.history]), rtol=1e-3, atol=1e-4)


def test_train_in_memory_on_the_device_returns_the_best_model_there(data, tmp_path):
    result = train(tiny(), data, None, "cpu-quick", device=DEVICE, export=tmp_path / "export",
                   overrides=FAST + ["epochs=2"])
    assert _on_device(result.model)
    # verified against the model on the device: TF32 (PyTorch's default for cuDNN convs) must not fail it
    assert result.verify.passed, result.verify


# ----------------------------------------------------------------------------- export, verify, predict


def test_export_deploy_verify_and_predict_from_the_device(data, tmp_path):
    torch.manual_seed(0)  # adaptive WS with BatchNorm kept: its fold is the stock timm model
    model, _ = wsurgery.convert(timm.create_model("test_efficientnet", num_classes=len(CLASSES)), mode="aws")
    model.eval()
    on_dev = clone_model(model).to(DEVICE)
    a = wsurgery.export(model, tmp_path / "cpu")
    b = wsurgery.export(on_dev, tmp_path / "dev")
    assert a.timm_compatible and b.timm_compatible
    wa = load_safetensors(tmp_path / "cpu" / "model.safetensors")
    wb = load_safetensors(tmp_path / "dev" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:  # the fold computed on the device: the same plain-conv weights
        assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    with allow_tf32(True):  # PyTorch's default for convs; verify must judge the arithmetic regardless
        result = wsurgery.verify(tmp_path / "dev", on_dev)
    assert result.passed and result.max_rel < 1e-4, result
    assert _on_device(on_dev) and not on_dev.training
    pytest.importorskip("onnxruntime")
    deployed = wsurgery.export_onnx(on_dev, tmp_path / "m.onnx")
    assert deployed.path.is_file() and _on_device(on_dev)
    assert wsurgery.verify(tmp_path / "m.onnx", on_dev).passed
    images = sorted((data / "val").rglob("*.png"))
    p_cpu = wsurgery.predict(tmp_path / "dev", images, topk=3, device="cpu")
    p_dev = wsurgery.predict(tmp_path / "dev", images, topk=3, device=DEVICE)
    assert [p.indices[0] for p in p_dev] == [p.indices[0] for p in p_cpu]
    assert_close(torch.tensor([p.probs for p in p_dev]), torch.tensor([p.probs for p in p_cpu]), rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- DDP with NCCL


# NCCL needs one GPU per rank: two ranks on one GPU stop at "Duplicate GPU detected" (NCCL 2.28, H100)
@pytest.mark.skipif(not ON_GPU or not dist.is_available() or not dist.is_nccl_available()
                    or torch.cuda.device_count() < 2, reason="needs NCCL and two GPUs")
def test_ddp_two_processes_nccl(tmp_path):
    check_two_ranks(tmp_path, "nccl")  # test_ddp.py's checks, one GPU per rank, bf16 autocast
