"""Eval folding is never stale and never saved; whole models pickle, trace and run on the meta device
(issue: drop-in you can trust, sections 3 and 4).

The reference for eval is always a fresh eager model loaded with the same state_dict, float64.
"""
import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

import fused_resnet
from fused_resnet.models import torchvision_reference as ref

TOL = dict(rtol=1e-10, atol=1e-10)


def _fused(arch="resnet18", seed=0, **kwargs):
    torch.manual_seed(seed)
    return fused_resnet.models.BUILDERS[arch](num_classes=5, **kwargs).double()


def _x(seed=1, batch=2, size=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)


def _fresh_eval(model, arch="resnet18"):
    """A fresh eager reference loaded with ``model``'s current state_dict, in eval mode."""
    eager = ref.build(arch, num_classes=5).double()
    eager.load_state_dict(model.state_dict())
    return eager.eval()


def _assert_eval_matches_fresh(model, x, what):
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), _fresh_eval(model)(x), **TOL, msg=lambda m: f"{what}: {m}")


def _perturb_(t):
    t.mul_(0.7).add_(0.05)


def test_eval_after_in_place_updates_through_data():
    """Patterns: an EMA of weights with ``p.data.mul_(d).add_(...)`` and weight clipping with
    ``p.data.clamp_()``, between eval forwards. Today eval keeps the old folded weights."""
    model, x = _fused(), _x()
    _assert_eval_matches_fresh(model, x, "first eval")
    with torch.no_grad():
        for p in model.parameters():
            p.data.mul_(0.9).add_(0.01 * torch.ones_like(p))  # EMA idiom
    _assert_eval_matches_fresh(model, x, "after an EMA update through .data")
    for p in model.parameters():
        p.data.clamp_(-0.05, 0.05)  # weight clipping (WGAN)
    _assert_eval_matches_fresh(model, x, "after clipping through .data")
    for b in model.buffers():
        if b.is_floating_point():
            b.data.mul_(1.5)  # running statistics edited through .data
    _assert_eval_matches_fresh(model, x, "after editing running statistics through .data")


def test_eval_after_vector_to_parameters_into_a_reused_buffer():
    """Pattern: torch.nn.utils.vector_to_parameters from one reused flat buffer (an optimizer's or a
    model-averaging loop's). Every tensor keeps its storage, so the old cache key matched."""
    model, x = _fused(), _x()
    params = list(model.parameters())
    flat = parameters_to_vector(params).detach().clone()
    vector_to_parameters(flat, params)
    _assert_eval_matches_fresh(model, x, "parameters viewing the buffer")
    for _ in range(2):
        _perturb_(flat)
        vector_to_parameters(flat, params)
        _assert_eval_matches_fresh(model, x, "after writing the reused buffer")


def test_eval_after_optimizer_step_load_state_dict_and_train():
    model, x = _fused(), _x()
    _assert_eval_matches_fresh(model, x, "eval")
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).square().mean().backward()
    opt.step()
    _assert_eval_matches_fresh(model, x, "after a step")
    model.load_state_dict(_fused(seed=9).state_dict())
    _assert_eval_matches_fresh(model, x, "after load_state_dict")


def _saved_bytes(obj) -> int:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.tell()


def test_eval_leaves_no_state_in_the_model():
    """Pattern: torch.save(model) after an eval forward. Today the fold cache in bn.__dict__ doubles the file."""
    model, x = _fused(), _x()
    before = _saved_bytes(model)
    keys = list(model.state_dict())
    attrs = {n: set(m.__dict__) for n, m in model.named_modules()}
    model.eval()
    with torch.no_grad():
        model(x)
    assert _saved_bytes(model) <= before * 1.001, "eval forwards must not add to what torch.save writes"
    assert list(model.state_dict()) == keys
    assert {n: set(m.__dict__) for n, m in model.named_modules()} == attrs, "eval added module attributes"


def test_deepcopy_after_eval_is_independent():
    model, x = _fused(), _x()
    model.eval()
    with torch.no_grad():
        model(x)
    clone = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    _assert_eval_matches_fresh(clone, x, "the copy")
    _assert_eval_matches_fresh(model, x, "the original")


class MyBottleneck(ref.Bottleneck):
    """A user's own subclass: convert() generates its fused class at run time."""


def _converted_user_model():
    torch.manual_seed(0)
    return fused_resnet.convert(ref.ResNet(MyBottleneck, [1, 1, 1, 1], num_classes=5).double())


@pytest.mark.parametrize("make", [_converted_user_model, _fused], ids=["convert", "builder"])
def test_whole_model_pickles_and_loads(make, tmp_path):
    """Pattern: torch.save(model) / torch.load(weights_only=False) of a convert()ed model. Today the generated
    class Fused<Name> claims a module in which it does not exist, and pickling fails."""
    model, x = make(), _x()
    model.train()
    model(x)  # moves the running statistics
    path = tmp_path / "model.pt"
    torch.save(model, path)
    loaded = torch.load(path, weights_only=False)
    assert type(loaded) is type(model) and type(loaded.layer1[0]) is type(model.layer1[0])
    for mode in (False, True):
        model.train(mode)
        loaded.train(mode)
        torch.testing.assert_close(loaded(x), model(x), **TOL)
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(again.eval()(x), model.eval()(x), **TOL)
    assert isinstance(copy.deepcopy(model).layer1[0], (ref.Bottleneck, ref.BasicBlock))


def test_pickle_in_a_fresh_process(tmp_path):
    """The generated classes are rebuilt on load in a process that has not converted anything yet."""
    import subprocess
    import sys

    model = _converted_user_model()
    path = tmp_path / "model.pt"
    torch.save(model, path)
    x = _x()
    expected = model.eval()(x)
    torch.save(dict(x=x, y=expected), tmp_path / "io.pt")
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]);"
        "m = torch.load(sys.argv[1] + '/model.pt', weights_only=False); d = torch.load(sys.argv[1] + '/io.pt');"
        "torch.testing.assert_close(m.eval()(d['x']), d['y'], rtol=1e-10, atol=1e-10); print('ok')")
    import os
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path), tests_dir], capture_output=True, text=True,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_jit_trace_eval_follows_load_state_dict():
    """Pattern: torch.jit.trace of an eval model with default settings. Today it fails ('Graphs differed
    across invocations') and, with a warm cache, bakes folded weights in as constants."""
    model, x = _fused(), _x()
    model.eval()
    with torch.no_grad():
        model(x)  # a warm eval forward first, as a user would have done
        traced = torch.jit.trace(model, x)
        torch.testing.assert_close(traced(x), _fresh_eval(model)(x), **TOL)
        other = _fused(seed=4)
        traced.load_state_dict(other.state_dict())
        torch.testing.assert_close(traced(x), _fresh_eval(other)(x), **TOL)


@pytest.mark.parametrize("training", [True, False])
def test_meta_device_forward(training):
    """Pattern: build on the meta device, run shape inference, then ``to_empty``. Today autocast is asked for
    on 'meta' and the forward fails."""
    with torch.device("meta"):
        model = fused_resnet.resnet18(num_classes=5)
    model.train(training)
    y = model(torch.empty(2, 3, 64, 64, device="meta"))
    assert y.device.type == "meta" and y.shape == (2, 5)
    if training:
        y.sum().backward()
        assert model.conv1.weight.grad.device.type == "meta"
    model.to_empty(device="cpu")
    assert model.conv1.weight.device.type == "cpu"


def test_module_tree_is_unchanged_by_eval():
    model = _fused()
    before = [(n, type(m)) for n, m in model.named_modules()]
    model.eval()
    with torch.no_grad():
        model(_x())
    assert [(n, type(m)) for n, m in model.named_modules()] == before
    assert all(type(m) is not nn.Identity for m in model.modules())


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_torch_export(training):
    """torch.export (the supported successor of tracing) sees the custom ops: same outputs as the model."""
    model, x = _fused(), _x()
    model.train(training)
    program = torch.export.export(copy.deepcopy(model), (x,))
    expected = model(x)
    torch.testing.assert_close(program.module()(x), expected, **TOL)
