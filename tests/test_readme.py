"""The README's Python API example runs as written (a smaller model, fewer steps), and does what it says."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from _data import make_folder

import wsurgery
from wsurgery.convert import clone_model

README = Path(__file__).resolve().parent.parent / "README.md"

# the only edits: a small model, short runs, and small inputs for the loop at the end
EDITS = {
    '"resnet50", pretrained=False': '"resnet10t", pretrained=False',
    'method="auto")': 'method="auto", steps=2, batch_size=4)',
    '"micro-batch",': '"cpu-quick",',
    'overrides=["epochs=1", "img_size=64"]': 'overrides=["img_size=32", "epochs=1", "batch_size=4", "workers=0"]',
}


def _api_example() -> str:
    text = README.read_text()
    section = text[text.index("## Python API"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_python_api_example_runs(tmp_path, monkeypatch):
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    code = _api_example()
    for old, new in EDITS.items():
        assert code.count(old) == 1, f"README's Python API example no longer contains {old!r}; update EDITS"
        code = code.replace(old, new)
    monkeypatch.chdir(tmp_path)
    make_folder(tmp_path / "photos", per_class=2, size=40)
    make_folder(tmp_path / "data", per_class=4, split="train")
    make_folder(tmp_path / "data", per_class=2, split="val", seed=1)
    shutil.copy(next((tmp_path / "photos").rglob("*.png")), tmp_path / "img.jpg")  # PIL reads by content
    x = torch.randn(2, 3, 32, 32)
    scope = {"micro_batches": [(x[:1], torch.tensor([0])), (x[1:], torch.tensor([1]))],
             "loss_fn": torch.nn.functional.cross_entropy}
    # run up to the accumulation loop, note the gradients and mode there, then run the loop
    loop = "with wsurgery.standardize_once(model):"
    assert code.count(loop) == 1, f"README's Python API example no longer contains {loop!r}"
    head, tail = code.split(loop)
    exec(compile(head, str(README), "exec"), scope)  # noqa: S102 - our own README
    model = scope["model"]
    grads_before = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
    training = model.training
    reference = clone_model(model)  # the weights the loop sees (nothing steps an optimizer in it)
    exec(compile(loop + tail, str(README), "exec"), scope)  # noqa: S102 - our own README

    # what the comments promise
    model, teacher, report = scope["model"], scope["teacher"], scope["report"]
    assert model is scope["run"].model and scope["run"].output == Path("runs/flowers")  # the trained model goes on
    assert report.num_convs == sum(isinstance(m, torch.nn.Conv2d) for m in teacher.modules())
    assert wsurgery.is_converted(model) and not wsurgery.is_converted(teacher)
    assert scope["result"].after is not None and scope["result"].num_images > 0
    assert scope["out"].directory == Path("export/r50") and scope["check"].passed
    assert scope["out"].verification.max_rel == scope["check"].max_rel  # verify=True ran the same check
    probe = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(scope["folded"].eval()(probe), model.eval()(probe), rtol=0, atol=0)
    preds = scope["preds"]
    # the trained model's 3 classes, by name (topk=5 is capped at the classes there are)
    assert len(preds) == 1 and sorted(preds[0].labels) == sorted(scope["run"].class_names) and preds[0].error is None
    for path in ("runs/r50-ws/config.json", "runs/flowers/model.safetensors", "export/r50.onnx", "export/r50.pt2"):
        assert (tmp_path / path).is_file(), path
    # the accumulation loop gave each parameter the gradient of the same micro-batches without standardize_once
    reference.train(training)
    reference.zero_grad(set_to_none=True)
    for x, y in scope["micro_batches"]:
        scope["loss_fn"](reference(x), y).backward()
    params = dict(model.named_parameters())
    ws = {name.rsplit(".parametrizations.", 1)[0] for name in params if ".parametrizations." in name}
    assert len(ws) >= 10  # the WS convs' raw weights (and AWS gain/shift) get theirs through the standardization
    for name, p in reference.named_parameters():
        assert p.grad is not None, name
        before = grads_before[name]
        expected = p.grad if before is None else before + p.grad
        assert params[name].grad is not None, f"{name}: no gradient after the accumulation loop"
        torch.testing.assert_close(params[name].grad, expected, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")
