"""DistributedDataParallel with synchronized BatchNorm on CPU (gloo, 2 processes over 127.0.0.1).

nn.SyncBatchNorm refuses CPU tensors, so the reference is one process running plain BatchNorm on the
concatenated batch, with the loss DDP effectively optimises: the mean over ranks of each rank's mean loss.
Per-rank batches are uneven (3 and 2) on purpose: the statistics must weight ranks by their counts.
"""
import datetime
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


def _model(fused: bool, sync: bool, how: str = "sync_bn"):
    """how: "sync_bn" (fused_resnet's option) or "torch_converter" (nn.SyncBatchNorm.convert_sync_batchnorm of
    a fused model, as torchvision's reference training script does for --sync-bn)."""
    torch.manual_seed(0)
    if fused and how == "torch_converter":
        return nn.SyncBatchNorm.convert_sync_batchnorm(fused_resnet.resnet18(num_classes=5)).double()
    if fused:
        return fused_resnet.resnet18(num_classes=5, sync_bn=sync).double()
    return ref.build("resnet18", num_classes=5).double()


def _init(rank, world, port):
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    # A collective that pairs with the wrong one on the other rank fails within the timeout, never hangs.
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))


def _worker(rank, world, port, out_dir, how):
    _init(rank, world, port)
    try:
        model = _model(fused=True, sync=True, how=how)
        # DDP refuses nn.SyncBatchNorm modules on CPU ("SyncBatchNorm layers only work with GPU modules"), so the
        # torch-converter model averages its gradients by hand, as DDP does.
        ddp = nn.parallel.DistributedDataParallel(model) if how == "sync_bn" else model
        opt = torch.optim.SGD(ddp.parameters(), lr=0.05, momentum=0.9)
        lo, hi = sum(SIZES[:rank]), sum(SIZES[:rank + 1])
        logits = []
        for step in range(STEPS):
            x, t = _data(step)
            opt.zero_grad()
            y = ddp(x[lo:hi])
            nn.functional.cross_entropy(y, t[lo:hi]).backward()  # DDP averages gradients over ranks
            if ddp is model:
                for p in model.parameters():
                    dist.all_reduce(p.grad)
                    p.grad /= world
            opt.step()
            logits.append(y.detach())
        torch.save(dict(logits=logits, grads={n: p.grad for n, p in model.named_parameters()},
                        state=model.state_dict()), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("how", ["sync_bn", "torch_converter"])
def test_ddp_sync_bn_matches_single_process_on_concatenated_batch(tmp_path, how):
    """Both ways of asking for synchronized BN. With torch's converter the model holds nn.SyncBatchNorm
    modules, which the fused blocks run fused and synchronised (eager nn.SyncBatchNorm refuses CPU tensors)."""
    port = _free_port()
    mp.start_processes(_worker, args=(2, port, str(tmp_path), how), nprocs=2, join=True, start_method="spawn")
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


def _empty_rank_worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        model = _model(fused=True, sync=True)
        x, _ = _data(0)
        mine = x[:4] if rank == 0 else x[:0]
        y = model(mine)
        y.square().sum().backward()
        # The next collective must pair with the same collective on the other rank.
        probe = torch.tensor([float(rank + 1)])
        dist.all_reduce(probe)
        torch.save(dict(y=y.detach(), grads={n: p.grad for n, p in model.named_parameters()},
                        state=model.state_dict(), probe=probe), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_sync_bn_with_an_empty_rank_joins_every_collective(tmp_path):
    """Pattern: an empty batch on one rank (the tail of an uneven dataset). Today that rank returns before the
    statistics all-reduce, in forward and backward, so its next collective pairs with the other rank's BN
    all-reduce. As nn.SyncBatchNorm, an empty rank now joins every collective with count 0: rank 0 computes
    plain BN on its own batch, and both ranks end with the same running statistics."""
    port = _free_port()
    mp.start_processes(_empty_rank_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["probe"].item() for r in ranks] == [3.0, 3.0]
    model = _model(fused=False, sync=False)
    x, _ = _data(0)
    y = model(x[:4])
    y.square().sum().backward()
    torch.testing.assert_close(ranks[0]["y"], y.detach(), rtol=1e-9, atol=1e-10)
    assert ranks[1]["y"].shape == (0, 5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(ranks[0]["grads"][n], p.grad, rtol=1e-9, atol=1e-12, msg=lambda m: f"{n}: {m}")
        g1 = ranks[1]["grads"][n]
        assert g1 is None or not g1.any(), f"rank 1 (empty) has a non-zero gradient for {n}"
    for r in ranks:
        for k, v in model.state_dict().items():
            torch.testing.assert_close(r["state"][k], v, rtol=1e-9, atol=1e-12, msg=lambda m: f"{k}: {m}")
