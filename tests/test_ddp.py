"""DistributedDataParallel: 2 processes with gloo on CPU train one model; parameters stay identical, loss falls."""

from __future__ import annotations

import json
import os
from collections.abc import Callable

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _data import CLASSES, make_train_val

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")

# the recipe both the ranks and the single-process comparison train with
SHARED_OVERRIDES = ["img_size=32", "epochs=4", "lr=0.01", "warmup_steps=2", "label_smoothing=0", "aug_scale=[0.8, 1.0]"]
# the update after which the ranks' weights are compared with one process's: the end of the first epoch.
# Later the two drift apart by more than rounding (two runs in one process with 2x4 and 8x1 images per update,
# equal to 1e-7 after 5 updates, differ by 2e-5 after 6 and 5e-3 after 7: this tiny model amplifies the
# last-bit differences of summing the gradients in another order)
COMPARED_STEP = 3


class _Stop(Exception):
    """Raised by the single-process run's callback once it has the weights compared."""


def _save_at(model, step: int, tmp: str, tag, stop: bool = False) -> Callable:
    """A train() callback writing ``model``'s weights after optimizer update ``step`` to ``tmp/step_<tag>``
    (and ending the run there with :class:`_Stop` if ``stop``)."""
    from wsurgery.io import save_safetensors

    def callback(event) -> None:
        if event.kind == "step" and event.step == step:
            save_safetensors({k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
                             os.path.join(tmp, f"step_{tag}.safetensors"))
            if stop:
                raise _Stop

    return callback


def _worker(rank: int, world: int, data: str, out: str, tmp: str, backend: str = "gloo") -> None:
    """One rank: train a converted model under DDP, then write its weights and history to ``tmp``.

    ``gloo`` trains on the CPU; ``nccl`` (tests/test_cuda.py) on GPU ``rank``, with bf16 autocast.
    """
    # what torchrun sets; the process group itself meets in a file (a free TCP port picked here
    # could be taken by another test process before the ranks bind it), so train() finds it ready
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"file://{os.path.join(tmp, 'pg_store')}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    import timm

    import wsurgery
    from wsurgery.io import save_safetensors
    from wsurgery.train import train

    torch.manual_seed(rank)  # different on purpose: DDP must broadcast rank 0's weights
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    model, _ = wsurgery.convert(model, mode="aws", norm="gn")
    result = train(model, data, out, "cpu-quick", device=device, callback=_save_at(model, COMPARED_STEP, tmp, rank),
                   overrides=[*SHARED_OVERRIDES, "batch_size=2", "accum_steps=2",
                              *(["amp=bf16"] if backend == "nccl" else [])])
    save_safetensors({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, f"rank{rank}.safetensors"))
    save_safetensors({k: v.cpu() for k, v in result.model.state_dict().items()},
                     os.path.join(tmp, f"rank{rank}_best.safetensors"))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"history": result.history, "steps": result.steps, "backend": dist.get_backend()}, f)
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path, one_thread):
    check_two_ranks(tmp_path, "gloo")
    # the gradients are averaged over the ranks: 2 ranks x 2 micro-batches of 2 train as one process with
    # 4 micro-batches of 2 on the same global batch. DistributedSampler deals rank r the positions r, r+2, ...
    # of the epoch's permutation (the same one for 1 process), so each update sees the same 8 images, each
    # with the same augmentation (seeded per image), and a GN model does not care how they are split
    import timm

    import wsurgery
    from wsurgery.io import load_safetensors
    from wsurgery.train import train

    torch.manual_seed(0)  # rank 0's initial weights, the ones DDP broadcast
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    model, _ = wsurgery.convert(model, mode="aws", norm="gn")
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(_Stop):  # the same recipe, so the same schedule (lr per update) as the ranks'
        train(model, str(tmp_path / "data"), None, "cpu-quick", device="cpu",
              callback=_save_at(model, COMPARED_STEP, str(tmp_path), "single", stop=True),
              overrides=[*SHARED_OVERRIDES, "batch_size=2", "accum_steps=4"])
    ddp = load_safetensors(tmp_path / "step_0.safetensors")
    assert load_safetensors(tmp_path / "step_1.safetensors").keys() == ddp.keys()
    single = load_safetensors(tmp_path / "step_single.safetensors")
    assert ddp.keys() == single.keys() == initial.keys()
    moved = 0.0
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
        if single[k].is_floating_point():
            moved = max(moved, (single[k] - initial[k]).abs().max().item())
    assert moved > 1e-3  # the runs trained: equal weights are not just the initial ones


def check_two_ranks(tmp_path, backend: str) -> None:
    """Train with 2 ranks; the ranks end with identical weights, the loss falls, only rank 0 writes."""
    data = make_train_val(tmp_path / "data")
    # one training image truncated (it passes the header check, fails to decode, the next sample stands in):
    # read once per epoch by whichever rank draws it, so train.json counts 4 over the ranks
    first = sorted((data / "train").glob("*/*.png"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, str(data), str(out), str(tmp_path), backend), nprocs=2, join=True)
    from wsurgery.io import load_safetensors

    a, b = load_safetensors(tmp_path / "rank0.safetensors"), load_safetensors(tmp_path / "rank1.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    h0 = json.loads((tmp_path / "rank0.json").read_text())
    h1 = json.loads((tmp_path / "rank1.json").read_text())
    # 24 images over 2 ranks, 2 micro-batches of 2 per step (standardize_once + manual all-reduce): 3 steps per epoch
    assert h0["steps"] == h1["steps"] == 12
    losses = [h["train_loss"] for h in h0["history"]]
    assert losses[-1] < losses[0]
    # the loss is averaged over the ranks, so both report the same numbers
    assert losses == [h["train_loss"] for h in h1["history"]]
    assert h0["backend"] == h1["backend"] == backend
    # rank 0 evaluated and wrote the run; every rank has its numbers and returns the best epoch's model
    assert "top1" in h0["history"][-1] and h1["history"] == h0["history"]
    assert (out / "model.safetensors").is_file() and (out / "last" / "train_state.json").is_file()
    assert json.loads((out / "train.json").read_text())["decode_failures"] == 4
    best = load_safetensors(out / "model.safetensors")
    for rank in (0, 1):
        returned = load_safetensors(tmp_path / f"rank{rank}_best.safetensors")
        assert returned.keys() == best.keys()
        for k in best:
            assert torch.equal(returned[k], best[k]), (rank, k)
