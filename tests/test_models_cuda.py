"""Model checks that need a CUDA device: bf16 autocast by the 2x-eager rule, CUDA graphs, torchvision itself,
and Inductor. Skipped (with the reason) on machines without CUDA; run them with scripts/gpu_session.sh."""
import copy

import pytest
import torch
from torch import nn

import fused_resnet
from fused_resnet import backends
from fused_resnet.models import torchvision_reference as ref
from helpers import assert_2x_eager

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPU_BACKENDS = [pytest.param(b, marks=pytest.mark.skipif(not backends.backend_status(b, "cuda")[0],
                                                         reason=f"backend {b!r} unavailable"))
                for b in ("triton", "cuda")]


def _pair(arch, backend, **kwargs):
    torch.manual_seed(0)
    eager = ref.build(arch, num_classes=10, **kwargs).cuda().to(memory_format=torch.channels_last)
    torch.manual_seed(0)
    fused = fused_resnet.models.BUILDERS[arch](num_classes=10, backend=backend, **kwargs).cuda()
    return eager, fused.to(memory_format=torch.channels_last)


def _batch(n=8, size=128):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 3, size, size, generator=g).cuda().contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (n,), generator=g).cuda()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_autocast_training_step_2x_eager_rule(backend, dtype):
    """One training step of a ResNet-50 under autocast: logits and every gradient within the 2x-eager-error
    rule against the float64 reference (same weights, same input)."""
    eager, fused = _pair("resnet50", backend)
    ref64 = copy.deepcopy(eager).double()
    x, t = _batch()
    seen = {}
    for k, m in (("eager", eager), ("fused", fused), ("ref", ref64)):
        with torch.autocast("cuda", dtype=dtype, enabled=k != "ref"):
            logits = m(x.double() if k == "ref" else x)
        nn.functional.cross_entropy(logits.double(), t).backward()
        seen[k] = dict(logits=logits.detach(), **{n: p.grad for n, p in m.named_parameters()})
    for name, r in seen["ref"].items():
        assert_2x_eager(name, seen["fused"][name], seen["eager"][name], r, dtype)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_float64_training_matches_eager_on_cuda(backend):
    """The model assembly on the GPU kernels: 2 SGD steps in float64, every gradient within 1e-6."""
    eager, fused = _pair("resnet50", backend)
    eager, fused = eager.double(), fused.double()
    x, t = _batch(n=4, size=64)
    opts = [torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for m in (eager, fused)]
    for _ in range(2):
        for m, o in zip((eager, fused), opts):
            o.zero_grad()
            nn.functional.cross_entropy(m(x.double()), t).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        for (n, p), q in zip(eager.named_parameters(), fused.parameters()):
            err = ((q.grad - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
            assert err <= 1e-6, f"grad {n}: {err:.2e}"
        for o in opts:
            o.step()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture_and_replay(backend):
    """A whole training step captured in a CUDA graph (no host syncs in the fused ops, momentum=None included)
    replays to the same numbers as eager execution."""
    torch.manual_seed(0)
    model = fused_resnet.resnet18(num_classes=10, backend=backend).cuda().to(memory_format=torch.channels_last)
    for m in model.modules():
        if isinstance(m, fused_resnet.BatchNormAct2d):
            m.momentum = None  # the cumulative-average factor is read on the device
    reference = copy.deepcopy(model)
    x, t = _batch(n=8, size=64)
    static_x, static_t = x.clone(), t.clone()

    def step():
        model.zero_grad(set_to_none=False)
        loss = nn.functional.cross_entropy(model(static_x), static_t)
        loss.backward()
        return loss

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up (Triton compilation, allocator) outside the graph
            step()
    torch.cuda.current_stream().wait_stream(s)
    reference.load_state_dict(model.state_dict())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    graph.replay()
    torch.cuda.synchronize()
    ref_loss = nn.functional.cross_entropy(reference(x), t)
    ref_loss.backward()
    torch.testing.assert_close(static_loss, ref_loss, rtol=1e-4, atol=1e-5)
    for (n, p), q in zip(reference.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-5, msg=lambda m: f"grad {n}: {m}")


def test_matches_torchvision_itself():
    """Where torchvision imports (the GPU machine has 0.26): keys, shapes and fp32 eval logits against
    torchvision's own ResNet-50, weights loaded both ways."""
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"torchvision unavailable: {exc}")
    tv = torchvision.models.resnet50(num_classes=10).cuda().eval()
    fused = fused_resnet.resnet50(num_classes=10).cuda().eval()
    assert list(tv.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(tv.state_dict(), strict=True)
    x, _ = _batch(n=4, size=96)
    torch.backends.cudnn.allow_tf32 = False
    with torch.no_grad():
        torch.testing.assert_close(fused(x), tv(x), rtol=1e-3, atol=1e-4)
    tv.load_state_dict(fused.state_dict(), strict=True)
    converted = fused_resnet.convert(copy.deepcopy(tv))
    assert not converted.fused_resnet_report.skipped
    with torch.no_grad():
        torch.testing.assert_close(converted(x), tv(x), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_inductor_fullgraph_training_on_cuda(backend):
    eager, fused = _pair("resnet18", backend)
    x, t = _batch(n=8, size=64)
    compiled = torch.compile(fused, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        a = compiled(x)
        b = fused(x)
    torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=2e-2)
