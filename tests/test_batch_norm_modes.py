"""nn.BatchNorm2d's modes, numerical stability, odd layouts and gradcheck, for every backend."""
import pytest
import torch

from conftest import backend_device_params, skip_unsupported
from fused_resnet import batch_norm_act, batch_norm_finalize, batch_norm_stats
from fused_resnet.nn import BatchNormAct2d
from helpers import assert_2x_eager, make_input, rel_err
from test_batch_norm_parity import Trio, check_step

SHAPE = (3, 65, 7, 9)
LOW = [torch.float32, torch.float16, torch.bfloat16]


def _step(trio, shape, dtype, device, memory_format=torch.channels_last, residual=True, seed=None):
    if seed is not None:
        torch.manual_seed(seed)
    x = make_input(shape, dtype, device, memory_format)
    r = make_input(shape, dtype, device, mean=0.0, std=1.0) if residual else None
    g = make_input(shape, dtype, device, mean=0.0, std=1.0)
    check_step(trio.step(x, r, g), dtype, x)


@pytest.mark.parametrize("dtype", LOW, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_momentum_none_three_steps(backend_device, dtype):
    """momentum=None: cumulative moving average over num_batches_tracked, fresh data every step."""
    backend, device = backend_device
    skip_unsupported(backend, device, dtype)
    trio = Trio(SHAPE[1], backend, device, relu=True, momentum=None)
    for step in range(3):
        _step(trio, SHAPE, dtype, device, seed=step)
        trio.check_buffers()
    assert trio.fused.num_batches_tracked.item() == 3


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_eval_mode_uses_running_stats(backend_device, relu):
    backend, device = backend_device
    trio = Trio(SHAPE[1], backend, device, relu=relu, momentum=0.3)
    _step(trio, SHAPE, torch.float32, device)  # moves the running stats away from (0, 1)
    trio.train(False)
    for memory_format in (torch.channels_last, torch.contiguous_format):
        _step(trio, SHAPE, torch.float32, device, memory_format)
    trio.check_buffers()
    assert trio.fused.num_batches_tracked.item() == 1, "eval must not count batches"


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_no_running_stats(backend_device, training):
    """track_running_stats=False normalises with batch statistics in train and eval alike."""
    backend, device = backend_device
    trio = Trio(SHAPE[1], backend, device, relu=True, track_running_stats=False)
    trio.train(training)
    _step(trio, SHAPE, torch.float32, device)
    trio.check_buffers()


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_affine_false_and_eps(backend_device):
    backend, device = backend_device
    trio = Trio(SHAPE[1], backend, device, relu=True, affine=False, eps=1e-2, momentum=0.5)
    for seed in range(2):
        _step(trio, SHAPE, torch.float32, device, seed=seed)
        trio.check_buffers()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_half_module(backend_device, dtype):
    """module.half() / .bfloat16(): parameters and buffers in the activation dtype, as eager allows."""
    backend, device = backend_device
    skip_unsupported(backend, device, dtype)
    trio = Trio(SHAPE[1], backend, device, relu=True)
    trio.fused.to(dtype)
    trio.eager.to(dtype)
    with torch.no_grad():  # the float64 reference computes with the same, rounded, parameters
        trio.ref.weight.copy_(trio.fused.weight.double().cpu())
        trio.ref.bias.copy_(trio.fused.bias.double().cpu())
    _step(trio, SHAPE, dtype, device)
    assert trio.fused.running_mean.dtype == dtype
    torch.testing.assert_close(trio.fused.running_mean.double().cpu(), trio.eager.running_mean.double().cpu(),
                               rtol=1e-2, atol=1e-3)
    torch.testing.assert_close(trio.fused.running_var.double().cpu(), trio.eager.running_var.double().cpu(),
                               rtol=1e-2, atol=1e-3)


@pytest.mark.parametrize("case", ["fp32_mean_1e4_std_1", "bf16_mean_5_std_0.1"])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_statistics_are_stable(backend_device, case):
    """Large mean against spread: a naive sum-of-squares variance loses every digit here."""
    backend, device = backend_device
    dtype, mean, std = {"fp32_mean_1e4_std_1": (torch.float32, 1e4, 1.0),
                        "bf16_mean_5_std_0.1": (torch.bfloat16, 5.0, 0.1)}[case]
    skip_unsupported(backend, device, dtype)
    shape = (8, 16, 48, 48)  # 18,432 rows per channel: several partial chunks on every backend
    x = make_input(shape, dtype, device, torch.channels_last, mean=mean, std=std)
    x64 = x.double().cpu()
    ref_var, ref_mean = torch.var_mean(x64, dim=(0, 2, 3), correction=0)
    stats = batch_norm_stats(x, backend=backend)
    assert stats.dtype == torch.float64 and stats.shape == (3, 16)
    assert torch.all(stats[0] == shape[0] * shape[2] * shape[3])
    mean_f, invstd_f = batch_norm_finalize(stats, eps=0.0, backend=backend)
    var_f = invstd_f.double().cpu() ** -2
    eager_var, eager_mean = torch.var_mean(x.float(), dim=(0, 2, 3), correction=0)
    assert rel_err(mean_f, ref_mean) <= 2 * rel_err(eager_mean, ref_mean) + 1e-7
    # Variance relative to itself: 1e-4 is tight enough to fail a naive E[x^2] - E[x]^2 by orders of magnitude.
    var_err = ((var_f - ref_var).abs() / ref_var).max().item()
    eager_var_err = ((eager_var.double().cpu() - ref_var).abs() / ref_var).max().item()
    assert var_err <= max(2 * eager_var_err, 1e-4), f"variance error {var_err:.2e} (eager {eager_var_err:.2e})"
    # And the normalised output through the module, against eager in the same dtype.
    trio = Trio(16, backend, device, relu=False)
    g = make_input(shape, dtype, device, mean=0.0, std=1.0)
    check_step(trio.step(x, None, g), dtype, x)
    trio.check_buffers()


def _layouts(shape, dtype, device):
    """Views the kernels must index correctly (or copy first), keyed by a readable name."""
    n, c, h, w = shape
    base = make_input((2 * n, 2 * c, h + 1, w + 2), dtype, device)
    cl = make_input((2 * n, 2 * c, h + 1, w + 2), dtype, device, torch.channels_last)
    nhwc_perm = make_input((n, w, h, c), dtype, device).permute(0, 3, 2, 1)  # H and W do not merge
    return {
        "batch_slice": base[::2, :c, :h, :w],
        "channel_slice": cl[:n, 1::2, :h, :w],
        "height_slice": base[:n, :c, 1:, :w],
        "width_slice": cl[:n, :c, :h, 2:],
        "nwhc_permute": nhwc_perm,
    }


@pytest.mark.parametrize("view", ["batch_slice", "channel_slice", "height_slice", "width_slice",
                                  "nwhc_permute"])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_non_contiguous_inputs(backend_device, view):
    backend, device = backend_device
    shape = (3, 6, 5, 7)
    views = _layouts(shape, torch.float32, device)
    x = views[view]
    assert x.shape == shape and not x.is_contiguous()
    residual = _layouts(shape, torch.float32, device)["channel_slice"]
    trio = Trio(shape[1], backend, device, relu=True)
    g = make_input(shape, torch.float32, device, mean=0.0, std=1.0)
    check_step(trio.step(x, residual, g), torch.float32, x)
    trio.check_buffers()


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_expanded_grad_output(backend_device):
    """y.sum().backward() hands the op a stride-0 (expanded) grad_output."""
    backend, device = backend_device
    shape = (4, 5, 6, 3)
    x = make_input(shape, torch.float32, device, torch.channels_last)
    r = make_input(shape, torch.float32, device)
    trio = Trio(shape[1], backend, device, relu=True)
    xs = [x.detach().clone().requires_grad_() for _ in range(2)]
    rs = [r.detach().clone().requires_grad_() for _ in range(2)]
    trio.fused(xs[0], rs[0]).sum().backward()
    torch.relu(trio.eager(xs[1]) + rs[1]).sum().backward()
    for a, b in ((xs[0].grad, xs[1].grad), (rs[0].grad, rs[1].grad), (trio.fused.weight.grad, trio.eager.weight.grad),
                 (trio.fused.bias.grad, trio.eager.bias.grad)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


GRADCHECK_MODES = {"train_add_relu": (True, True, True), "train_plain": (True, False, False),
                   "eval_add_relu": (False, True, True)}


@pytest.mark.parametrize("mode", GRADCHECK_MODES)
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_gradcheck_float64(backend_device, mode):
    backend, device = backend_device
    training, with_residual, relu = GRADCHECK_MODES[mode]
    shape = (2, 3, 3, 4)
    opts = dict(dtype=torch.float64, device=device)
    x = make_input(shape, torch.float64, device, torch.channels_last).requires_grad_()
    w = (torch.rand(3, **opts) + 0.5).requires_grad_()
    b = (torch.rand(3, **opts) - 0.5).requires_grad_()
    r = make_input(shape, torch.float64, device).requires_grad_() if with_residual else None
    rm, rv = torch.randn(3, **opts), torch.rand(3, **opts) + 0.5

    def f(x, w, b, *r):
        return batch_norm_act(x, None if training else rm, None if training else rv, w, b, training=training,
                              residual=r[0] if r else None, relu=relu, backend=backend)

    inputs = (x, w, b) + ((r,) if r is not None else ())
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_deterministic(backend_device):
    """Fixed-order reductions (no atomics): bitwise identical results run to run."""
    backend, device = backend_device
    shape = (8, 40, 12, 12)
    x = make_input(shape, torch.float32, device, torch.channels_last)
    g = make_input(shape, torch.float32, device)
    results = []
    for _ in range(2):
        bn = BatchNormAct2d(40, fuse_relu=True, backend=backend).to(device)
        xi = x.clone().requires_grad_()
        bn(xi).backward(g)
        results.append((xi.grad, bn.weight.grad, bn.running_var))
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_empty_batch_matches_eager(backend_device):
    """N = 0: empty output, zero parameter gradients, running stats untouched, the batch still counted."""
    backend, device = backend_device
    trio = Trio(4, backend, device, relu=True)
    x = torch.randn(0, 4, 3, 3, device=device)
    outs = []
    for module in (trio.fused, trio.eager):
        xi = x.clone().requires_grad_()
        y = module(xi) if module is trio.fused else torch.relu(module(xi))
        y.sum().backward()
        outs.append((y.shape, module.weight.grad, module.running_mean, module.running_var,
                     module.num_batches_tracked))
    assert outs[0][0] == outs[1][0] == x.shape
    for a, b in zip(outs[0][1:], outs[1][1:]):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("backend_device", backend_device_params())
def test_autocast_conv_bn_relu(backend_device, dtype):
    """The autocast case: a convolution under torch.autocast hands a half-precision activation to a module
    whose parameters and buffers stay fp32; output in the activation dtype, grads match eager."""
    backend, device = backend_device
    skip_unsupported(backend, device, dtype)
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("CPU autocast runs convolutions in bf16 only")
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False).to(device)
    fused = BatchNormAct2d(16, fuse_relu=True, backend=backend).to(device)
    eager = torch.nn.BatchNorm2d(16).to(device)
    x = make_input((4, 3, 10, 10), torch.float32, device, torch.channels_last)
    results = []
    for module in (fused, eager):
        conv.zero_grad()
        with torch.autocast(device_type=device, dtype=dtype):
            h = conv(x)
            y = module(h) if module is fused else torch.relu(module(h))
        assert h.dtype == dtype and y.dtype == dtype
        y.float().square().sum().backward()
        results.append((y.float(), conv.weight.grad.clone(), module.weight.grad, module.running_var))
    assert fused.weight.dtype == fused.running_mean.dtype == torch.float32
    for name, a, b in zip(("y", "conv.weight.grad", "bn.weight.grad", "running_var"), *results):
        tol = 2e-2 if dtype == torch.bfloat16 else 5e-3
        err = ((a - b).abs().max() / b.abs().max()).item()
        assert err <= tol, f"{name}: relative difference to eager {err:.2e} > {tol}"
