"""Hooks, parametrizations and pruning keep working after convert() (issue: drop-in you can trust, section 2).

A fused block whose modules carry hooks (module or global), parametrizations or pruning runs through its
modules' own ``__call__`` for that forward: every hook fires with the values eager PyTorch gives it, and an
output-modifying hook changes the result as it does in eager. Every comparison is float64 against an
unconverted deep copy holding the same hooks, over two SGD steps.
"""
import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

import fused_resnet
from fused_resnet.models import torchvision_reference as ref


def _close(a, b, what=""):
    """Equal up to float64 summation order: max |a - b| / max |b| <= 1e-8. (The cpu backend may run a small
    map's convolution as one GEMM instead of oneDNN's kernel, chosen per shape: another summation order, whose
    rounding a few training steps amplify to ~1e-9. A wiring or recompute error shows at 1e-3 and above.)"""
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    # An absolute floor of 1e-12 for tensors that are zero up to rounding (a bias gradient through a BN).
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-3)
    assert err <= 1e-8, f"{what}: error {err:.2e}"


def _pair(arch="resnet18", prepare=None):
    """(fused, eager) with the same weights; ``prepare(eager)`` (pruning, parametrizations, whose state may be
    random) runs before the copy, so both models hold the same."""
    torch.manual_seed(0)
    eager = ref.build(arch, num_classes=5).double()
    if prepare is not None:
        prepare(eager)
    fused = fused_resnet.convert(copy.deepcopy(eager))
    return fused, eager


def _x(seed=1, batch=2, size=64):  # 64x64: 8 values per channel in the last BatchNorms (2 is degenerate)
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)


def _train_steps(fused, eager, steps=2, modes=(True, False)):
    """Two SGD steps, then an eval forward: outputs and every gradient equal."""
    opts = [torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) for m in (fused, eager)]
    for step in range(steps):
        for mode in modes:
            outs = []
            for m, opt in zip((fused, eager), opts):
                m.train(mode)
                opt.zero_grad(set_to_none=True)
                y = m(_x(seed=step))
                y.square().mean().backward()
                outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
            _close(outs[0][0], outs[1][0], f"step {step} train={mode} output")
            for n, g in outs[1][1].items():
                _close(outs[0][1][n], g, f"step {step} train={mode} grad {n}")
            if mode:
                for opt in opts:
                    opt.step()


def _on_both(fused, eager, path, register):
    """register(module_of_fused, module_of_eager) for the submodule at ``path`` of each model."""
    return register(fused.get_submodule(path), eager.get_submodule(path))


@pytest.mark.parametrize("path", ["layer1.0.bn1", "layer1.0.conv2", "layer1.0.relu", "bn1", "relu", "maxpool",
                                  "layer2.0.downsample.1", "layer2.0.bn2"])
def test_forward_hooks_fire_with_eager_values(path):
    """Pattern: forward hooks registered after convert() for feature extraction (fused BN, conv, ReLU and the
    stem's pool). Today they never fire."""
    fused, eager = _pair()
    seen = {"fused": [], "eager": []}
    fused.get_submodule(path).register_forward_hook(lambda m, i, o: seen["fused"].append(o.detach().clone()))
    eager.get_submodule(path).register_forward_hook(lambda m, i, o: seen["eager"].append(o.detach().clone()))
    _train_steps(fused, eager, steps=1)
    assert len(seen["fused"]) == len(seen["eager"]) > 0, f"{path}: hook fired {len(seen['fused'])} times"
    for a, b in zip(seen["fused"], seen["eager"]):
        _close(a, b)


def test_hooks_registered_before_convert_fire():
    torch.manual_seed(0)
    eager = ref.build("resnet18", num_classes=5).double()
    calls = []
    eager.layer1[0].bn2.register_forward_hook(lambda m, i, o: calls.append(1))
    fused = fused_resnet.convert(copy.deepcopy(eager))
    fused(_x())
    assert len(calls) == 1


@pytest.mark.parametrize("path", ["layer1.0.conv2", "layer1.0.bn1", "maxpool", "layer1.1.conv1"])
def test_forward_pre_hooks_fire(path):
    fused, eager = _pair()
    seen = {"fused": [], "eager": []}
    for name, model in (("fused", fused), ("eager", eager)):
        model.get_submodule(path).register_forward_pre_hook(
            lambda m, args, name=name: seen[name].append(args[0].detach().clone()))
    _train_steps(fused, eager, steps=1)
    assert len(seen["fused"]) == len(seen["eager"]) > 0
    for a, b in zip(seen["fused"], seen["eager"]):
        _close(a, b)


@pytest.mark.parametrize("path", ["layer1.0.bn2", "layer2.0.conv2", "layer2.0.downsample.1", "bn1"])
def test_output_modifying_hooks_change_the_result(path):
    """Pattern: a hook that returns a modified output (here: scaled by 0.5). Today it is ignored."""
    fused, eager = _pair()
    for m in (fused, eager):
        m.get_submodule(path).register_forward_hook(lambda mod, i, o: o * 0.5)
    _train_steps(fused, eager)


def test_input_modifying_pre_hook():
    fused, eager = _pair()
    for m in (fused, eager):
        m.layer1[1].conv2.register_forward_pre_hook(lambda mod, args: (args[0] + 1.0,))
    _train_steps(fused, eager)


def test_prune_across_steps():
    """Pattern: torch.nn.utils.prune on a conv inside a block (a forward pre-hook that recomputes ``weight``).
    Today the second step fails with 'backward through the graph a second time'."""
    fused, eager = _pair()
    for m in (fused, eager):  # deterministic masks (a pruned module cannot be deep-copied)
        prune.l1_unstructured(m.layer1[0].conv2, "weight", amount=0.3)
        prune.ln_structured(m.layer2[0].downsample[0], "weight", amount=0.25, n=2, dim=0)
    _train_steps(fused, eager, steps=3)
    # Pruning registered after convert() too.
    for m in (fused, eager):
        prune.l1_unstructured(m.layer3[1].conv1, "weight", amount=0.5)
    _train_steps(fused, eager, steps=2)


@pytest.mark.parametrize("kind", ["weight_norm", "spectral_norm"])
def test_parametrizations_on_convs_inside_blocks(kind):
    """Pattern: torch.nn.utils.parametrizations.weight_norm / spectral_norm on convolutions inside a block."""
    fn = getattr(parametrizations, kind)

    def prepare(m):
        fn(m.layer1[0].conv1)
        fn(m.layer2[0].conv2)
        fn(m.conv1)

    fused, eager = _pair(prepare=prepare)
    _train_steps(fused, eager)


def test_full_backward_hook_fires():
    fused, eager = _pair()
    seen = {"fused": [], "eager": []}
    for name, model in (("fused", fused), ("eager", eager)):
        model.layer1[0].conv2.register_full_backward_hook(
            lambda m, gi, go, name=name: seen[name].append(go[0].detach().clone()))
    _train_steps(fused, eager, steps=1, modes=(True,))
    assert len(seen["fused"]) == len(seen["eager"]) == 1
    _close(seen["fused"][0], seen["eager"][0])


def test_global_module_hooks_see_every_module_call():
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook) sees the same module calls
    in the same order with the same outputs."""
    fused, eager = _pair()
    calls = []

    def hook(module, args, output):
        calls.append((type(module).__name__, output.detach().clone() if torch.is_tensor(output) else None))

    handle = nn.modules.module.register_module_forward_hook(hook)
    try:
        results = []
        for m in (fused, eager):
            calls.clear()
            m.train()
            m(_x())
            results.append(list(calls))
    finally:
        handle.remove()
    def plain_name(name):  # a fused block keeps its class as a base; a fused BatchNorm is a BatchNorm2d
        return {"BatchNormAct2d": "BatchNorm2d"}.get(name, name.removeprefix("Fused"))

    (fused_calls, eager_calls) = results
    assert [plain_name(n) for n, _ in fused_calls] == [n for n, _ in eager_calls]
    for (_, a), (_, b) in zip(fused_calls, eager_calls):
        _close(a, b)


def test_removing_hooks_restores_the_fused_path():
    """Hooks decide per forward: once removed, the block runs fused again (the ReLUs run inside the fused
    BatchNorm kernels, so no ATen relu is left)."""
    fused, _ = _pair()
    handle = fused.layer1[0].bn1.register_forward_hook(lambda m, i, o: None)
    handle.remove()
    with torch.profiler.profile() as prof:
        fused.train()(_x())
    names = {e.name for e in prof.events()}
    assert not names & {"aten::relu", "aten::relu_"}, sorted(names)
