"""Calibration edge cases found in review: held-out photos, partial BN batches, per-module modes, divergence."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from test_calibrate import _images, _state, make_teacher
from torch import nn

import wsurgery
from wsurgery.calibrate import PRECONDITIONED_ATTR, calibration_split, reestimate_bn_stats
from wsurgery.errors import UsageError


def test_held_out_crops_come_from_photos_not_calibrated_on(tmp_path):
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]
    for i, colour in enumerate(colours):  # solid photos: every crop of one keeps its colour
        Image.fromarray(np.full((48, 48, 3), colour, dtype=np.uint8)).save(tmp_path / f"p{i}.png")
    model = timm.create_model("test_efficientnet", pretrained=False)
    calib, held = calibration_split(tmp_path, model, 0.25, limit=64, seed=0, crops_per_image=8)
    assert isinstance(held, torch.Tensor) and held.shape[0] == 8 and calib.shape[0] == 24

    def photos(batch):  # the photo each crop came from, by its (constant) colour
        return {tuple(round(float(v), 3) for v in img.mean(dim=(1, 2))) for img in batch}

    assert len(photos(held)) == 1 and len(photos(calib)) == 3 and not photos(held) & photos(calib)
    # one crop per file: the fraction goes to calibrate as it is
    images, fraction = calibration_split(tmp_path, model, 0.25, crops_per_image=1)
    assert images.shape[0] == 4 and fraction == 0.25
    # --calib-images is a limit on every image read, held-out ones included: 1 image with 2 crops each
    # was 1 calibration crop + 1 held out; as calibrate's own split, too few to hold one out
    for fraction, limit, calibrated, held_out in [(0.25, 1, 1, None), (0.25, 2, 2, None), (0.25, 4, 3, 1),
                                                  (0.75, 2, 1, 1), (0.9, 4, 1, 3)]:
        images, held = calibration_split(tmp_path, model, fraction, limit=limit, seed=0, crops_per_image=2)
        assert images.shape[0] == calibrated, (fraction, limit)
        assert (held if held is None else held.shape[0]) == held_out, (fraction, limit)
    for count in (2, 1.0, -0.1, True):  # a count (calibrate takes one) would be read as a fraction of the photos
        with pytest.raises(UsageError, match="held_out must be a fraction in"):
            calibration_split(tmp_path, model, count, limit=8, crops_per_image=2)


def test_bn_stats_weigh_every_image_alike_with_a_partial_last_batch():
    teacher = make_teacher()
    student = wsurgery.convert(teacher, mode="ws", inplace=False)[0]
    x = _images(65, seed=5)  # batches of 64 and 1
    reestimate_bn_stats(student, x, batch_size=64)
    with torch.no_grad():
        conv_out = student[0](x)
    torch.testing.assert_close(student[1].running_mean, conv_out.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-5)


def test_calibrate_gives_every_submodule_its_own_mode_back():
    teacher, student_src = make_teacher(), make_teacher()
    student = wsurgery.convert(student_src, mode="ws", inplace=False)[0]
    for model in (teacher, student):
        model.train()
        model[1].eval()  # a frozen BatchNorm inside a model in training mode
    modes = {id(m): m.training for model in (teacher, student) for m in model.modules()}
    before = _state(teacher)
    wsurgery.calibrate(student, teacher, _images(16, seed=6), method="bn-stats", held_out=4)
    assert {id(m): m.training for model in (teacher, student) for m in model.modules()} == modes
    assert not teacher[1].training
    after = _state(teacher)
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("precondition", [False, True])
def test_a_diverged_distillation_leaves_the_student_as_it_came(precondition, monkeypatch):
    teacher = make_teacher()
    student = wsurgery.convert(teacher, mode="aws", norm="gn", inplace=False)[0]
    before = _state(student)
    module = sys.modules["wsurgery.calibrate"]
    real_kl, calls = module._kl, []

    def diverging(*args):  # the third step's loss is NaN, after two steps changed the weights
        calls.append(1)
        loss = real_kl(*args)
        return loss * float("nan") if len(calls) == 3 else loss * 1e3

    monkeypatch.setattr(module, "_kl", diverging)
    with pytest.raises(UsageError, match="diverged"):
        wsurgery.calibrate(student, teacher, _images(32, seed=7), method="auto", train="all", steps=5,
                           held_out=None, precondition=precondition)
    monkeypatch.setattr(module, "_kl", real_kl)
    after = _state(student)
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert not hasattr(student, PRECONDITIONED_ATTR)
    assert all(m.bias is None for m in student.modules() if isinstance(m, nn.Conv2d))
    # and a retry at a sane rate calibrates
    result = wsurgery.calibrate(student, teacher, _images(32, seed=7), method="auto", steps=3, held_out=8,
                                precondition=precondition)
    assert result.after.kl <= result.before.kl
