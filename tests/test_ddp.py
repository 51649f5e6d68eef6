"""DistributedDataParallel: 2 processes with gloo on CPU train one model; parameters stay identical, loss falls."""

from __future__ import annotations

import json
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from _data import CLASSES, make_folder

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _worker(rank: int, world: int, data: str, out: str, tmp: str) -> None:
    # what torchrun sets; the process group itself meets in a file (a free TCP port picked here
    # could be taken by another test process before the ranks bind it), so train() finds it ready
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank), LOCAL_RANK=str(rank))
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(tmp, 'pg_store')}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    import timm

    import wsurgery
    from wsurgery.io import save_safetensors
    from wsurgery.train import train

    torch.manual_seed(rank)  # different on purpose: DDP must broadcast rank 0's weights
    model = timm.create_model("test_efficientnet", pretrained=False, num_classes=len(CLASSES))
    model, _ = wsurgery.convert(model, mode="aws", norm="gn")
    result = train(model, data, out, "cpu-quick", device="cpu",
                   overrides=["img_size=32", "batch_size=2", "accum_steps=2", "epochs=4", "lr=0.01", "warmup_steps=2",
                              "label_smoothing=0", "aug_scale=[0.8, 1.0]"])
    save_safetensors(model.state_dict(), os.path.join(tmp, f"rank{rank}.safetensors"))
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"history": result.history, "steps": result.steps}, f)
    dist.destroy_process_group()


def test_ddp_two_processes_gloo(tmp_path):
    data = make_folder(tmp_path / "data", per_class=8, split="train")
    make_folder(tmp_path / "data", per_class=4, split="val", seed=1)
    out = tmp_path / "run"
    mp.spawn(_worker, args=(2, str(data), str(out), str(tmp_path)), nprocs=2, join=True)
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
    # only rank 0 evaluated and wrote the run
    assert "top1" in h0["history"][-1] and "top1" not in h1["history"][-1]
    assert (out / "model.safetensors").is_file() and (out / "last" / "train_state.json").is_file()
