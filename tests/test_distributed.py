"""DistributedDataParallel with synchronized BatchNorm on CPU (gloo, 2 processes over 127.0.0.1).

nn.SyncBatchNorm refuses CPU tensors, so the reference is one process running plain BatchNorm on the
concatenated batch, with the loss DDP effectively optimises: the mean over ranks of each rank's mean loss.
Per-rank batches are uneven (3 and 2) on purpose: the statistics must weight ranks by their counts.
"""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import fused_resnet
from fused_resnet.models import torchvision_reference as ref

SIZES = [3, 2]
STEPS = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _data(step):
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(sum(SIZES), 3, 64, 64, generator=g, dtype=torch.float64)
    t = torch.randint(0, 5, (sum(SIZES),), generator=g)
    return x.contiguous(memory_format=torch.channels_last), t


def _model(fused: bool, sync: bool):
    torch.manual_seed(0)
    if fused:
        return fused_resnet.resnet18(num_classes=5, sync_bn=sync).double()
    return ref.build("resnet18", num_classes=5).double()


def _worker(rank, world, port, out_dir):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = _model(fused=True, sync=True)
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        lo, hi = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
        logits = []
        for step in range(STEPS):
            x, t = _data(step)
            opt.zero_grad()
            y = ddp(x[lo:hi])
            nn.functional.cross_entropy(y, t[lo:hi]).backward()  # DDP averages gradients over ranks
            opt.step()
            logits.append(y.detach())
        torch.save(dict(logits=logits, grads={n: p.grad for n, p in model.named_parameters()},
                        state=model.state_dict()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_sync_bn_matches_single_process_on_concatenated_batch(tmp_path):
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]

    model = _model(fused=False, sync=False)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for step in range(STEPS):
        x, t = _data(step)
        opt.zero_grad()
        y = model(x)  # plain BN over the whole concatenated batch
        bounds = [(sum(SIZES[:r]), sum(SIZES[:r + 1])) for r in range(2)]
        loss = sum(nn.functional.cross_entropy(y[lo:hi], t[lo:hi]) for lo, hi in bounds) / len(SIZES)
        loss.backward()
        opt.step()
        torch.testing.assert_close(torch.cat([r["logits"][step] for r in ranks]), y.detach(), rtol=1e-9, atol=1e-10,
                                   msg=lambda m: f"step {step} outputs: {m}")
    for r, result in enumerate(ranks):
        for n, p in model.named_parameters():
            torch.testing.assert_close(result["grads"][n], p.grad, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"rank {r} grad {n}: {m}")
        for k, v in model.state_dict().items():
            torch.testing.assert_close(result["state"][k], v, rtol=1e-9, atol=1e-12,
                                       msg=lambda m: f"rank {r} {k}: {m}")


def test_sync_bn_without_process_group_is_plain_bn():
    """sync_bn=True outside torch.distributed (or in a world of one) behaves exactly as plain BN."""
    assert not dist.is_initialized()
    x, t = _data(0)
    outs = []
    for sync in (False, True):
        model = _model(fused=True, sync=sync)
        y = model(x)
        nn.functional.cross_entropy(y, t).backward()
        outs.append((y, model.conv1.weight.grad))
    for a, b in zip(*outs):
        assert torch.equal(a, b)
