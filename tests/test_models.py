"""The drop-in ResNet family against the eager reference (torchvision's architecture, in-tree), on CPU.

Every architecture: identical state_dict keys and shapes both ways (strict loading), identical initial weights
from the same seed, eval logits, and 3 SGD steps in train mode with matching parameters, gradients (every step)
and BN buffers.

Precision of the training comparison. The multi-step parity runs in float64, where the fused and eager models
must agree to 1e-6: a deterministic check of the whole assembly (wiring, recompute, folding, running
statistics). In fp32, training these nets from scratch at test-sized batches is chaotic (measured): each fp32
model lands ~1e-2 away from float64 after one or two steps, and which one lands closer depends on where a
ReLU input within rounding of zero happens to fall; the seed decides, not the implementation. So fp32 is
checked where it is well conditioned (ResNet-18 at 96x96, 3 steps, within 1e-4 of float64) and on the first
step of a ResNet-50 by the 2x-eager rule, errors scaled by the whole gradient's norm. The kernels' own fp32,
fp16 and bf16 precision is tested op by op in test_batch_norm_*.py.
"""
import copy
import functools

import pytest
import torch
from torch import nn

import fused_resnet
from conftest import backend_device_params
from fused_resnet.models import torchvision_reference as ref
from helpers import assert_2x_eager, rel_err

ARCHS = list(ref.ARCHITECTURES)
SMALL = dict(num_classes=7)


FUSED_ONLY = ("backend", "sync_bn")


def _pair(arch, seed=0, **kwargs):
    """The eager reference and the fused model of ``arch``, from the same seed (hence the same weights)."""
    torch.manual_seed(seed)
    eager = ref.build(arch, **SMALL, **{k: v for k, v in kwargs.items() if k not in FUSED_ONLY})
    torch.manual_seed(seed)
    fused = fused_resnet.models.BUILDERS[arch](**SMALL, **kwargs)
    return eager, fused


def _assert_close(name, a, b, rtol=1e-4, atol=1e-5):
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def _data(steps=3, batch=2, size=32, seed=1, memory_format=torch.channels_last):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, 3, size, size, generator=g).contiguous(memory_format=memory_format) for _ in range(steps)]
    ts = [torch.randint(0, SMALL["num_classes"], (batch,), generator=g) for _ in range(steps)]
    return xs, ts


def _run_steps(models: dict, steps: int, batch: int, size: int, lr: float = 1e-2, check=None) -> None:
    """SGD steps (momentum 0.9, gradients clipped to norm 1) on every model, inputs cast to each model's dtype.
    Before each update, ``check(step, seen)`` gets per model the loss, logits and every parameter's gradient
    (not kept: the large architectures in float64 would not fit twice).

    Clipping, as practitioners do without warm-up: at initialisation a ResNet-152's gradient norm is ~1e5 at
    this batch size, and an unclipped step throws the net into a regime that amplifies any difference by
    ~1e3 per step (measured), float64 rounding included."""
    opts = {k: torch.optim.SGD(m.parameters(), lr=lr, momentum=0.9) for k, m in models.items()}
    xs, ts = _data(steps=steps, batch=batch, size=size)
    for step in range(steps):
        seen = {}
        for k, m in models.items():
            m.train()
            opts[k].zero_grad(set_to_none=True)
            logits = m(xs[step].to(next(m.parameters()).dtype))
            loss = nn.functional.cross_entropy(logits, ts[step])
            loss.backward()
            seen[k] = dict(loss=loss.detach(), logits=logits.detach(),
                           grads={n: p.grad for n, p in m.named_parameters()})
        if check is not None:
            check(step, seen)
        for k, m in models.items():
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[k].step()


def _state(m):
    return dict(m.named_parameters()) | {n: b for n, b in m.named_buffers()}


def _train_and_compare(models: dict, a: str, b: str, tol: float, steps: int, batch: int, size: int,
                       lr: float = 1e-2) -> None:
    """SGD steps; every step's loss, logits and gradients, then parameters and buffers: max-normalised
    error of model a against model b <= tol."""
    def check(step, seen):
        for name in ("loss", "logits"):
            err = rel_err(seen[a][name], seen[b][name])
            assert err <= tol, f"step {step}: {name}: error {err:.2e} > {tol:.0e}"
        for n, g in seen[b]["grads"].items():
            err = rel_err(seen[a]["grads"][n], g)
            assert err <= tol, f"step {step}: grad {n}: error {err:.2e} > {tol:.0e}"

    _run_steps(models, steps, batch, size, lr=lr, check=check)
    sa, sb = _state(models[a]), _state(models[b])
    for n, t in sb.items():
        if t.is_floating_point():
            err = rel_err(sa[n], t)
            assert err <= tol, f"after {steps} steps: {n}: error {err:.2e} > {tol:.0e}"
        else:
            assert torch.equal(sa[n], t), n


@pytest.mark.parametrize("arch", ARCHS)
def test_state_dict_matches_reference_and_loads_both_ways(arch):
    eager, fused = _pair(arch)
    sd_e, sd_f = eager.state_dict(), fused.state_dict()
    assert list(sd_e) == list(sd_f)
    for k in sd_e:
        assert sd_e[k].shape == sd_f[k].shape and sd_e[k].dtype == sd_f[k].dtype, k
        assert torch.equal(sd_e[k], sd_f[k]), f"{k}: the same seed must give the same initialisation"
    torch.manual_seed(123)
    other = ref.build(arch, **SMALL)
    fused.load_state_dict(other.state_dict(), strict=True)
    eager.load_state_dict(fused.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), other.state_dict().values()))


@pytest.mark.parametrize("arch", ARCHS)
def test_training_matches_reference_float64(arch):
    """3 SGD steps, both models in float64: loss, logits and gradients every step, then parameters and BN
    buffers, within 1e-6; then eval logits (BatchNorm folded into the convolutions)."""
    eager, fused = _pair(arch)
    models = {"eager": eager.double(), "fused": fused.double()}
    # 64x64: 8 values per channel in the last BatchNorms (at 2, BN is degenerate and amplifies even float64
    # rounding by ~1e8).
    _train_and_compare(models, "fused", "eager", tol=1e-6, steps=3, batch=2, size=64)
    x = _data(steps=1, batch=1, size=64, seed=7)[0][0].double()
    with torch.no_grad():
        err = rel_err(fused.eval()(x), eager.eval()(x))
    assert err <= 1e-6, f"eval logits: error {err:.2e}"


def test_training_fp32_well_conditioned_resnet18():
    """fp32, 3 SGD steps at 96x96 (enough values per channel in the last BatchNorms for fp32 to be well
    conditioned): the fused model within 1e-4 of the float64 reference everywhere."""
    eager, fused = _pair("resnet18")
    models = {"fused": fused, "ref": copy.deepcopy(eager).double()}
    _train_and_compare(models, "fused", "ref", tol=1e-4, steps=3, batch=4, size=96, lr=1e-3)


def test_training_fp32_first_step_resnet50():
    """fp32 first step of a ResNet-50 (identical weights): 2x-eager rule against float64, each gradient's
    error scaled by the norm of the whole gradient (see the module docstring for why)."""
    eager, fused = _pair("resnet50")
    models = {"eager": eager, "fused": fused, "ref": copy.deepcopy(eager).double()}
    captured = {}
    _run_steps(models, steps=1, batch=4, size=96, check=lambda step, seen: captured.update(seen))
    seen = captured
    for name in ("loss", "logits"):
        assert_2x_eager(name, seen["fused"][name], seen["eager"][name], seen["ref"][name], torch.float32, 1e-4)
    ref_grads = seen["ref"]["grads"]
    total = torch.sqrt(sum((g ** 2).sum() for g in ref_grads.values()))
    for n, g in ref_grads.items():
        e_fused = ((seen["fused"]["grads"][n].double() - g).norm() / total).item()
        e_eager = ((seen["eager"]["grads"][n].double() - g).norm() / total).item()
        assert e_fused <= 2 * e_eager + 1e-3, f"grad {n}: fused error {e_fused:.2e} vs eager {e_eager:.2e}"


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_every_backend_trains_resnet18_like_eager(backend_device):
    """Each backend's kernels in the whole model: 2 SGD steps in float64 against eager."""
    backend, device = backend_device
    eager, fused = _pair("resnet18", backend=backend)
    models = {"eager": eager.double().to(device), "fused": fused.double().to(device)}
    _train_and_compare(models, "fused", "eager", tol=1e-6, steps=2, batch=2, size=64)


def test_contiguous_input_and_dilation():
    eager, fused = _pair("resnet50", replace_stride_with_dilation=[False, True, True])
    models = {"eager": eager.double(), "fused": fused.double()}
    _train_and_compare(models, "fused", "eager", tol=1e-6, steps=2, batch=2, size=64)


def test_zero_init_residual_and_norm_layer():
    eager, fused = _pair("resnet50", zero_init_residual=True,
                         norm_layer=functools.partial(nn.BatchNorm2d, eps=1e-3, momentum=0.2))
    assert all(torch.equal(a, b) for a, b in zip(eager.state_dict().values(), fused.state_dict().values()))
    assert fused.layer1[0].bn3.weight.abs().sum() == 0
    assert fused.layer2[1].bn2.eps == 1e-3 and fused.layer2[1].bn2.momentum == 0.2
    models = {"eager": eager.double(), "fused": fused.double()}
    _train_and_compare(models, "fused", "eager", tol=1e-6, steps=2, batch=2, size=64)
    with pytest.raises(ValueError, match="norm_layer must build nn.BatchNorm2d"):
        fused_resnet.resnet18(norm_layer=lambda c: nn.GroupNorm(2, c))


def test_eval_with_autograd_after_inference_mode():
    """Constants cached during a first forward under torch.inference_mode must not be inference tensors: an eval
    forward with autograd recording saves them for backward (regression: 'Inference tensors cannot be saved')."""
    from fused_resnet import reference

    reference._UNIT.clear()  # the first use of each constant happens below, under inference_mode
    eager, fused = _pair("resnet18")
    x = _data()[0][0]
    for m in (eager, fused):
        m.eval()
    with torch.inference_mode():
        expected = eager(x)
        _assert_close("eval under inference_mode", fused(x), expected)
    fused(x).sum().backward()
    eager(x).sum().backward()
    _assert_close("conv1 grad through the fold", fused.conv1.weight.grad, eager.conv1.weight.grad)


def test_eval_refolds_after_parameter_changes():
    """No stale folded weights after an optimizer step, load_state_dict, or train() moving the statistics."""
    eager, fused = _pair("resnet18")
    xs, ts = _data()
    x = xs[0]

    def compare(what):
        for m in (eager, fused):
            m.eval()
        with torch.no_grad():
            _assert_close(what, fused(x), eager(x))

    compare("eval")
    compare("eval again")
    _run_steps({"fused": fused}, steps=1, batch=2, size=64, lr=0.5)  # moves parameters and running stats in place
    eager.load_state_dict(fused.state_dict())
    compare("eval after an optimizer step and a training forward")
    torch.manual_seed(5)
    new = ref.build("resnet18", **SMALL).state_dict()
    eager.load_state_dict(new)
    fused.load_state_dict(new)
    compare("eval after load_state_dict")
    # Gradients in eval mode flow through the fold to the conv and BN parameters.
    fused.zero_grad()
    eager.zero_grad()
    fused(x).sum().backward()
    eager(x).sum().backward()
    for name, p in eager.named_parameters():
        _assert_close(f"eval grad {name}", dict(fused.named_parameters())[name].grad, p.grad)


def test_convert_reference_model_in_place():
    """convert() mid-training keeps every Parameter object (optimizer momentum stays valid), and training
    continues exactly like the unconverted model (float64)."""
    torch.manual_seed(0)
    original = ref.build("resnet50", **SMALL).double()
    converted = copy.deepcopy(original)
    models = {"eager": original, "fused": converted}
    opts = {k: torch.optim.SGD(m.parameters(), lr=1e-2, momentum=0.9) for k, m in models.items()}
    params_before = [id(p) for p in converted.parameters()]
    xs, ts = _data(steps=3, batch=2, size=64)
    for step, (x, t) in enumerate(zip(xs, ts)):
        if step == 1:  # the optimizer already holds momentum buffers
            assert fused_resnet.convert(converted) is converted
            assert [id(p) for p in converted.parameters()] == params_before
        for k, m in models.items():
            opts[k].zero_grad()
            nn.functional.cross_entropy(m(x.double()), t).backward()
            torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            opts[k].step()
    assert isinstance(converted.layer1[0], ref.Bottleneck), "still a Bottleneck (isinstance preserved)"
    assert isinstance(converted.layer1[0].bn1, fused_resnet.BatchNormAct2d)
    report = converted.fused_resnet_report
    assert len(report.fused) == 1 + 16 and not report.skipped, str(report)
    so, sc = _state(original), _state(converted)
    for n, t in so.items():
        if t.is_floating_point():
            assert rel_err(sc[n], t) <= 1e-6, n
            if n in dict(original.named_parameters()):
                assert rel_err(sc[n].grad, t.grad) <= 1e-6, f"grad {n}"


def test_convert_generic_patterns_and_report():
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
        nn.BatchNorm2d(8),  # not after a conv: left alone
        nn.Sequential(nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4), nn.ReLU()),
    )
    eager = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    keys_before = list(model.state_dict())
    fused_resnet.convert(model)
    assert list(model.state_dict()) == keys_before
    report = model.fused_resnet_report
    assert "1: conv+bn+relu" in report.fused and "4: conv+bn" in report.fused and "6.1: conv+bn+relu" in report.fused
    assert len(report.skipped) == 1 and report.skipped[0].startswith("5:"), str(report)
    # Every child keeps its class and meaning (the ReLU stays a ReLU; the Sequential fuses bn+relu itself).
    assert type(model[2]) is nn.ReLU and isinstance(model[1], fused_resnet.BatchNormAct2d)
    assert type(model[5]) is nn.BatchNorm2d
    for mode in (True, False):
        model.train(mode)
        eager.train(mode)
        _assert_close(f"converted Sequential (train={mode})", model(x), eager(x))


def test_weights_argument():
    torch.manual_seed(3)
    donor = ref.build("resnet18", **SMALL)
    sd = donor.state_dict()
    m = fused_resnet.resnet18(weights=sd, **SMALL)
    assert all(torch.equal(a, b) for a, b in zip(m.state_dict().values(), sd.values()))
    with pytest.raises(RuntimeError, match="size mismatch"):
        fused_resnet.resnet18(weights=sd)  # 1000 classes vs 7
    with pytest.raises(TypeError, match="weights must be"):
        fused_resnet.resnet18(weights=3.5)


def test_weights_from_path_and_torchvision_name(tmp_path):
    torch.manual_seed(3)
    sd = ref.build("resnet18", **SMALL).state_dict()
    path = tmp_path / "r18.pth"
    torch.save(sd, path)
    m = fused_resnet.resnet18(weights=str(path), **SMALL)
    assert torch.equal(m.fc.weight, sd["fc.weight"])
    # A torchvision weights name: a clear error without torchvision or without network, never a hang.
    with pytest.raises((RuntimeError, ValueError), match="torchvision|download"):
        fused_resnet.resnet18(weights="IMAGENET1K_V1")


def test_sync_bn_option_and_convert_sync_batchnorm():
    m = fused_resnet.resnet18(sync_bn=True, **SMALL)
    assert all(bn.sync for bn in m.modules() if isinstance(bn, fused_resnet.BatchNormAct2d))
    fused_resnet.convert_sync_batchnorm(m, enabled=False)
    assert not any(bn.sync for bn in m.modules() if isinstance(bn, fused_resnet.BatchNormAct2d))
    # without an initialised process group, sync BN is plain BN
    eager, fused = _pair("resnet18", sync_bn=True)
    models = {"eager": eager.double(), "fused": fused.double()}
    _train_and_compare(models, "fused", "eager", tol=1e-6, steps=1, batch=2, size=64)


def test_autocast_bf16_cpu():
    """bf16 autocast on CPU: bf16 activations with fp32 parameters and buffers; logits and every gradient
    within the 2x-eager-error rule against a float64 reference (floor 1e-2)."""
    eager, fused = _pair("resnet18")
    models = {"eager": eager, "fused": fused, "ref": copy.deepcopy(eager).double()}
    xs, ts = _data(steps=1, batch=4, size=96)
    seen = {}
    for k, m in models.items():
        m.train()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=k != "ref"):
            logits = m(xs[0].double() if k == "ref" else xs[0])
        if k != "ref":
            assert logits.dtype == torch.bfloat16
        nn.functional.cross_entropy(logits.float() if k != "ref" else logits, ts[0]).backward()
        seen[k] = dict(logits=logits.detach(), **{n: p.grad for n, p in m.named_parameters()})
    assert fused.bn1.running_mean.dtype == torch.float32 and fused.bn1.weight.dtype == torch.float32
    for name, r in seen["ref"].items():
        assert_2x_eager(name, seen["fused"][name], seen["eager"][name], r, torch.bfloat16)
