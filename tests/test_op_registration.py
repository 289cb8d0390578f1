"""The ops as torch sees them: schemas, fake kernels, autograd registration (opcheck) and torch.compile."""
import pytest
import torch
from torch import nn

from conftest import backend_device_params
from fused_resnet import backends
from fused_resnet.nn import BatchNormAct2d
from helpers import make_input

needs_extension = pytest.mark.skipif(not backends.extension_loaded(),
                                     reason="the compiled extension fused_resnet._C is not built")


def _op_inputs(device, dtype=torch.float32, memory_format=torch.channels_last):
    shape = (3, 5, 4, 6)
    x = make_input(shape, dtype, device, memory_format)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    c = shape[1]
    return dict(
        x=x,
        residual=make_input(shape, dtype, device),
        grad=make_input(shape, dtype, device, mean=0.0, std=1.0),
        weight=torch.rand(c, device=device) + 0.5,
        bias=torch.rand(c, device=device) - 0.5,
        mean=torch.randn(c, device=device, dtype=acc),
        invstd=torch.rand(c, device=device, dtype=acc) + 0.5,
        running_mean=torch.randn(c, device=device),
        running_var=torch.rand(c, device=device) + 0.5,
        nbt=torch.tensor(3, device=device),
    )


def _compiled_op_cases(device):
    """(op name, args) covering every compiled op and its optional-argument variants."""
    cases = []
    for dtype, fmt in ((torch.float32, torch.channels_last), (torch.float16, torch.contiguous_format),
                       (torch.float64, torch.channels_last)):
        a = _op_inputs(device, dtype, fmt)
        x = a["x"]
        stats = torch.ops.fused_resnet_C.bn_stats(x)
        sums = torch.rand(2, x.shape[1], device=device, dtype=a["mean"].dtype)
        out = torch.relu(a["residual"])
        cases += [
            ("bn_stats", (x,)),
            ("bn_stats", (x[:, 1:4],)),
            ("bn_finalize", (stats, a["running_mean"], a["running_var"], None, 0.1, 1e-5, a["mean"].dtype)),
            ("bn_finalize", (stats, a["running_mean"], a["running_var"], a["nbt"], None, 1e-3, torch.float32)),
            ("bn_finalize", (stats, None, None, None, 0.1, 1e-5, torch.float64)),
            ("bn_act", (x, a["mean"], a["invstd"], a["weight"], a["bias"], a["residual"], True)),
            ("bn_act", (x, a["mean"], a["invstd"], None, None, None, False)),
            ("bn_backward_reduce", (a["grad"], x, a["mean"], a["invstd"], a["weight"], a["bias"], None, True)),
            ("bn_backward_reduce", (a["grad"], x, a["mean"], a["invstd"], None, None, out, True)),
            ("bn_backward_elemt", (a["grad"], x, a["mean"], a["invstd"], a["weight"], a["bias"], out, sums,
                                   stats[0], True, True)),
            ("bn_backward_elemt", (a["grad"], x, a["mean"], a["invstd"], None, None, None, None, None, False,
                                   False)),
        ]
    return cases


@needs_extension
@pytest.mark.parametrize("case", range(33))
def test_opcheck_compiled_ops_cpu(case):
    name, args = _compiled_op_cases("cpu")[case]
    torch.library.opcheck(getattr(torch.ops.fused_resnet_C, name).default, args)


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_opcheck_contract_ops(backend_device):
    """The fused_resnet:: custom ops, including bn_act's autograd registration, on each backend."""
    backend, device = backend_device
    a = _op_inputs(device)
    x = a["x"]
    stats = torch.ops.fused_resnet.bn_stats(x, backend)
    count = stats[0]
    cases = [
        (torch.ops.fused_resnet.bn_stats, (x, backend)),
        (torch.ops.fused_resnet.bn_finalize, (stats, a["running_mean"], a["running_var"], a["nbt"], None, 1e-5,
                                              torch.float32, backend)),
        (torch.ops.fused_resnet.bn_act, (x.detach().requires_grad_(), a["mean"], a["invstd"],
                                         a["weight"].detach().requires_grad_(), a["bias"].detach().requires_grad_(),
                                         a["residual"].detach().requires_grad_(), count, True, backend, None)),
        (torch.ops.fused_resnet.bn_act, (x.detach().requires_grad_(), a["mean"], a["invstd"], None, None, None,
                                         None, False, backend, None)),
        (torch.ops.fused_resnet.bn_backward_reduce, (a["grad"], x, a["mean"], a["invstd"], a["weight"], None,
                                                     None, True, backend)),
        (torch.ops.fused_resnet.bn_backward_elemt, (a["grad"], x, a["mean"], a["invstd"], a["weight"], None,
                                                    None, None, None, True, True, backend)),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args)


def _small_net(backend, device):
    torch.manual_seed(1)
    net = nn.ModuleDict(dict(
        conv1=nn.Conv2d(3, 8, 3, padding=1, bias=False), bn1=BatchNormAct2d(8, fuse_relu=True, backend=backend),
        conv2=nn.Conv2d(8, 8, 3, padding=1, bias=False), bn2=BatchNormAct2d(8, fuse_relu=True, backend=backend),
    )).to(device)

    def forward(x):
        h = net["bn1"](net["conv1"](x))
        return net["bn2"](net["conv2"](h), residual=h)

    return net, forward


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_compile_fullgraph_train_and_eval(backend_device):
    """No graph breaks (fullgraph=True) and the same numbers as uncompiled, forward and backward."""
    backend, device = backend_device
    x = make_input((2, 3, 8, 8), torch.float32, device, torch.channels_last)
    results = []
    for compiled in (False, True):
        net, forward = _small_net(backend, device)
        torch._dynamo.reset()
        fn = torch.compile(forward, fullgraph=True, backend="aot_eager") if compiled else forward
        for step in range(2):
            net.train(step == 0)
            xi = x.clone().requires_grad_()
            y = fn(xi)
            y.square().sum().backward()
        results.append((y, xi.grad, net["bn1"].weight.grad, net["conv1"].weight.grad, net["bn2"].running_var,
                        net["bn2"].num_batches_tracked))
    for eager_value, compiled_value in zip(*results):
        torch.testing.assert_close(compiled_value, eager_value, rtol=1e-5, atol=1e-6)


def test_compile_inductor_cpu():
    """The default Inductor backend, once (slow on CPU): custom ops stay extern kernels around its code."""
    device = "cpu"
    backend = backends.resolve(None, torch.device(device))
    x = make_input((2, 3, 8, 8), torch.float32, device, torch.channels_last)
    outs = []
    for compiled in (False, True):
        net, forward = _small_net(backend, device)
        torch._dynamo.reset()
        fn = torch.compile(forward, fullgraph=True) if compiled else forward
        xi = x.clone().requires_grad_()
        y = fn(xi)
        y.sum().backward()
        outs.append((y, xi.grad, net["bn2"].weight.grad, net["bn1"].running_mean))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_opcheck_recompute_ops(backend_device):
    """conv_stats (with and without the BatchNorm prologue, each convolution implementation the backend has),
    conv_bias_act and bn_act_maxpool: schemas, fakes (output strides of the real convolution / pool) and
    autograd registration."""
    from fused_resnet import dispatch

    backend, device = backend_device
    a = _op_inputs(device)
    x = a["x"]
    count = torch.ops.fused_resnet.bn_stats(x, backend)[0]
    conv_w = torch.randn(4, 5, 3, 3, device=device).contiguous(memory_format=torch.channels_last)
    grads = dict(x=x.detach().requires_grad_(), w=a["weight"].detach().requires_grad_(),
                 b=a["bias"].detach().requires_grad_(), cw=conv_w.requires_grad_())
    impls = [i for i in dispatch.CONV_IMPLS if i == "aten" or (backend == "triton" and
                                                                dispatch.supports_conv(i, x, conv_w))]
    for impl in impls:
        torch.library.opcheck(torch.ops.fused_resnet.conv_stats.default,
                              (grads["x"], grads["cw"], [2, 1], [1, 1], [1, 1], 1, a["mean"], a["invstd"], grads["w"],
                               grads["b"], count, True, impl, backend, None))
        torch.library.opcheck(torch.ops.fused_resnet.conv_stats.default,
                              (grads["x"], grads["cw"], [1, 1], [0, 1], [1, 1], 1, None, None, None, None, None, False,
                               impl, backend, None))
        bias = torch.randn(4, device=device, requires_grad=True)
        y, _ = torch.ops.fused_resnet.conv_stats(x, conv_w, [1, 1], [1, 1], [1, 1], 1, None, None, None, None, None,
                                                 False, impl, backend, None)
        if dispatch.conv_functions(impl, backend).dgrad_bn is not None:
            torch.library.opcheck(torch.ops.fused_resnet.conv_dgrad_bn.default,
                                  (torch.randn_like(y), conv_w.detach(), x, a["mean"], a["invstd"], a["weight"], a["bias"],
                                   True, [1, 1], [1, 1], [1, 1], 1, True, impl, backend))
        if dispatch.conv_functions(impl, backend).backward is not None:
            for prologue in ((a["mean"], a["invstd"], a["weight"], a["bias"], True), (None, None, None, None, False)):
                torch.library.opcheck(torch.ops.fused_resnet.conv_dgrad_wgrad.default,
                                      (torch.randn_like(y), x, conv_w.detach(), [1, 1], [1, 1], [1, 1], 1, *prologue,
                                       impl, backend))
        torch.library.opcheck(torch.ops.fused_resnet.conv_bias_act.default,
                              (grads["x"], grads["cw"], bias, torch.randn_like(y).requires_grad_(), [1, 1], [1, 1],
                               [1, 1], 1, True, impl, backend))
    torch.library.opcheck(torch.ops.fused_resnet.bn_act_maxpool.default,
                          (grads["x"], a["mean"], a["invstd"], grads["w"], grads["b"], count, [3, 3], [2, 2],
                           [1, 1], [1, 1], False, True, backend, None))


@pytest.mark.parametrize("backend_device", backend_device_params())
def test_compile_fullgraph_fused_resnet(backend_device):
    """A whole fused ResNet-18 under torch.compile(fullgraph=True): training steps and eval (folded BN) give
    the eager fused model's numbers (float64, so the comparison is exact to rounding)."""
    import fused_resnet

    backend, device = backend_device
    x = make_input((2, 3, 64, 64), torch.float64, device, torch.channels_last)
    target = torch.tensor([1, 3], device=device)
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = fused_resnet.resnet18(num_classes=5, backend=backend).double().to(device)
        torch._dynamo.reset()
        fn = torch.compile(model, fullgraph=True, backend="aot_eager") if compiled else model
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            model.train()
            opt.zero_grad()
            torch.nn.functional.cross_entropy(fn(x), target).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            logits = fn(x)
        results.append((logits, model.conv1.weight, model.layer4[1].bn2.running_var, model.fc.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)
