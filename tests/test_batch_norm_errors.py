"""Bad input gets a clear error (never a crash or a silently wrong number); NaN propagates like eager."""
import pytest
import torch

from conftest import backend_device_params
from fused_resnet import BackendUnavailableError, batch_norm_act
from fused_resnet.nn import BatchNormAct2d


@pytest.fixture(params=backend_device_params())
def bn(request):
    backend, device = request.param
    return BatchNormAct2d(4, fuse_relu=True, backend=backend).to(device), device


def test_wrong_ndim(bn):
    module, device = bn
    with pytest.raises(ValueError, match=r"expected 4D input \(got 3D input\)"):
        module(torch.randn(2, 4, 5, device=device))
    with pytest.raises(ValueError, match="expected 4D input"):
        batch_norm_act(torch.randn(2, 4, 5, 5, 1, device=device), None, None, training=True)


def test_channel_mismatch(bn):
    module, device = bn
    with pytest.raises(ValueError, match="should contain 3 elements"):
        module(torch.randn(2, 3, 5, 5, device=device))


def test_residual_mismatch(bn):
    module, device = bn
    x = torch.randn(2, 4, 5, 5, device=device)
    with pytest.raises(ValueError, match="residual has shape"):
        module(x, torch.randn(2, 4, 5, 4, device=device))
    with pytest.raises(TypeError, match="residual dtype"):
        module(x, torch.randn(2, 4, 5, 5, device=device, dtype=torch.float64))


def test_dtype_errors(bn):
    module, device = bn
    with pytest.raises(TypeError, match="not supported"):
        module(torch.randint(0, 5, (2, 4, 5, 5), device=device))
    x = torch.randn(2, 4, 5, 5, device=device)
    with pytest.raises(TypeError, match="weight must be a floating-point tensor"):
        batch_norm_act(x, None, None, torch.ones(4, dtype=torch.int64, device=device), training=True)


def test_device_mismatch(bn):
    module, device = bn
    x = torch.randn(2, 4, 5, 5, device=device)
    with pytest.raises(ValueError, match="weight is on meta"):
        batch_norm_act(x, None, None, torch.ones(4, device="meta"), training=True)
    with pytest.raises(ValueError, match="residual is on meta"):
        module(x, torch.randn(2, 4, 5, 5, device="meta"))


def test_one_value_per_channel_matches_pytorch(bn):
    module, device = bn
    x = torch.randn(1, 4, 1, 1, device=device)
    with pytest.raises(ValueError) as ours:
        module(x)
    with pytest.raises(ValueError) as eager:
        torch.nn.BatchNorm2d(4).to(device)(x)
    assert str(ours.value) == str(eager.value)
    module.eval()
    assert torch.isfinite(module(x)).all(), "eval mode uses running stats: one value is fine"


def test_training_without_buffers_in_eval(bn):
    _, device = bn
    with pytest.raises(ValueError, match="required when training=False"):
        batch_norm_act(torch.randn(2, 4, 5, 5, device=device), None, None, training=False)


def test_momentum_none_needs_counter():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(ValueError, match="needs num_batches_tracked"):
        batch_norm_act(x, torch.zeros(4), torch.ones(4), training=True, momentum=None)


def test_nan_propagates_like_eager(bn):
    module, device = bn
    eager = torch.nn.BatchNorm2d(4).to(device)
    x = torch.randn(3, 4, 5, 5, device=device)
    x[1, 2, 3, 4] = float("nan")
    y = module(x)
    y_eager = torch.relu(eager(x))
    assert torch.isnan(y[:, 2]).all(), "a NaN poisons its channel's statistics, hence the whole channel"
    assert torch.isfinite(y[:, [0, 1, 3]]).all(), "and nothing else"
    assert torch.equal(torch.isnan(y), torch.isnan(y_eager))
    assert torch.equal(torch.isnan(module.running_var), torch.isnan(eager.running_var))


def test_unavailable_backend_is_a_clear_error():
    x = torch.randn(2, 4, 5, 5)
    with pytest.raises(BackendUnavailableError, match="'cuda' backend runs CUDA tensors"):
        batch_norm_act(x, None, None, training=True, backend="cuda")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        batch_norm_act(x, None, None, training=True, backend="fast")


def test_inputs_are_not_modified(bn):
    module, device = bn
    x = torch.randn(3, 4, 5, 5, device=device)
    r = torch.randn(3, 4, 5, 5, device=device)
    x0, r0 = x.clone(), r.clone()
    module(x, r).sum()
    assert torch.equal(x, x0) and torch.equal(r, r0)
