"""DistributedDataParallel: 2 processes with gloo on CPU train one model; parameters stay identical, loss falls."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from _data import CLASSES, make_train_val

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


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
    result = train(model, data, out, "cpu-quick", device=device,
                   overrides=["img_size=32", "batch_size=2", "accum_steps=2", "epochs=4", "lr=0.01", "warmup_steps=2",
                              "label_smoothing=0", "aug_scale=[0.8, 1.0]",
                              *(["amp=bf16"] if backend == "nccl" else [])])
    save_safetensors({k: v.cpu() for k, v in model.state_dict().items()}, os.path.join(tmp, f"rank{rank}.safetensors"))
    save_safetensors({k: v.cpu() for k, v in result.model.state_dict().items()},
                     os.path.join(tmp, f"rank{rank}_best.safetensors"))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"history": result.history, "steps": result.steps, "backend": dist.get_backend()}, f)
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    check_two_ranks(tmp_path, "gloo")


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
