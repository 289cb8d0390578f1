"""convert() never changes what a model computes (issue: drop-in you can trust, section 1).

A module is fused only when its forward, and the forward of every child the fused forward replaces, is one
fused_resnet knows (torchvision's, the in-tree reference's, its own). Everything else runs as written and is
listed in ``model.fused_resnet_report`` with the reason. Every comparison is float64, fused against an
unconverted deep copy, in training and eval mode.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fused_resnet
from fused_resnet.models import torchvision_reference as ref


def _x(batch=2, size=32, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, size, size, generator=g, dtype=torch.float64)


def _close(a, b, what, tol=1e-9):
    """Equal up to float64 summation order: max |a - b| / max |b| <= tol (or both None: an unused parameter)."""
    if a is None or b is None:
        assert a is None and b is None, f"{what}: one is None"
        return
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} != {tuple(b.shape)}"
    # An absolute floor of 1e-12 for tensors that are zero up to rounding (a bias gradient through a BN).
    err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-12 / tol)
    assert err <= tol, f"{what}: error {err:.2e} > {tol:.0e}"


def _assert_same_function(fused, eager, x, modes=(True, False)):
    """Outputs and every parameter gradient equal in each mode (train first, so eval sees moved statistics)."""
    for mode in modes:
        fused.train(mode)
        eager.train(mode)
        outs = []
        for m in (fused, eager):
            m.zero_grad(set_to_none=True)
            y = m(x)
            y.square().mean().backward()
            outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
        (yf, gf), (ye, ge) = outs
        _close(yf, ye, f"train={mode} output")
        for n, g in ge.items():
            _close(gf[n], g, f"train={mode} grad {n}")


def _small_resnet(block=ref.BasicBlock, cls=ref.ResNet, seed=0):
    torch.manual_seed(seed)
    return cls(block, [1, 1, 1, 1], num_classes=5).double()


def _convert_copy(model):
    eager = copy.deepcopy(model)
    return fused_resnet.convert(model), eager


class FeatureResNet(ref.ResNet):
    """A feature extractor: its forward returns layer1's features, not logits."""

    def forward(self, x):
        return self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))


class ScaledBasicBlock(ref.BasicBlock):
    """A BasicBlock with its own forward: a scaled residual branch."""

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(0.5 * self.bn2(self.conv2(out)) + identity)


class StdConv2d(nn.Conv2d):
    """Weight standardisation (timm's StdConv2d): the convolution reads a transformed weight."""

    def forward(self, x):
        var, mean = torch.var_mean(self.weight, dim=(1, 2, 3), keepdim=True, correction=0)
        w = (self.weight - mean) / torch.sqrt(var + 1e-6)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class BasicBlockWithoutDownsample(nn.Module):
    """Named like a BasicBlock, with its children, but no ``downsample`` attribute at all."""

    def __init__(self, c):
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class MyBasicBlock(BasicBlockWithoutDownsample):
    pass


def test_resnet_subclass_with_own_forward_keeps_it():
    """Pattern: a ResNet subclass used as a feature extractor (forward returns layer1 features). Today it
    returns logits after convert()."""
    model, eager = _convert_copy(_small_resnet(cls=FeatureResNet))
    _assert_same_function(model, eager, _x())
    report = model.fused_resnet_report
    assert any(s.startswith("(model)") and "forward" in s for s in report.skipped), str(report)
    assert any(f.startswith("layer1.0:") for f in report.fused), "its known blocks are still fused"


def test_block_subclass_with_own_forward_keeps_it():
    """Pattern: a BasicBlock subclass with its own forward (a scaled residual)."""
    model, eager = _convert_copy(_small_resnet(block=ScaledBasicBlock))
    _assert_same_function(model, eager, _x())
    report = model.fused_resnet_report
    assert any(s.startswith("layer1.0:") and "ScaledBasicBlock" in s for s in report.skipped), str(report)
    assert not any(f.startswith("layer1.0:") for f in report.fused), str(report)


def test_block_subclass_without_own_forward_is_fused():
    """A subclass that only inherits the reference forward computes exactly it: fused."""
    class PlainSubclass(ref.Bottleneck):
        pass

    model, eager = _convert_copy(_small_resnet(block=PlainSubclass))
    _assert_same_function(model, eager, _x())
    assert any(f.startswith("layer1.0: Bottleneck") for f in model.fused_resnet_report.fused)
    assert isinstance(model.layer1[0], PlainSubclass)


def test_conv_subclass_with_own_forward_is_not_bypassed():
    """Pattern: weight standardisation (a Conv2d subclass with its own forward) inside a block. Today the
    fused block reads conv.weight directly and skips the standardisation."""
    model = _small_resnet()
    old = model.layer1[0].conv2
    std = StdConv2d(old.in_channels, old.out_channels, 3, padding=1, bias=False).double()
    std.load_state_dict(old.state_dict())
    model.layer1[0].conv2 = std
    model, eager = _convert_copy(model)
    _assert_same_function(model, eager, _x())
    assert any(s.startswith("layer1.0:") and "StdConv2d" in s for s in model.fused_resnet_report.skipped)


def test_block_without_downsample_attribute_converts_all_or_nothing():
    """Pattern: a block class named ...BasicBlock without a ``downsample`` attribute. Today convert() raises
    half-way and leaves the model half-converted."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          MyBasicBlock(8)).double()
    model, eager = _convert_copy(model)
    block = model[3]
    assert type(block) is MyBasicBlock and type(block.bn1) is nn.BatchNorm2d and type(block.bn2) is nn.BatchNorm2d
    _assert_same_function(model, eager, _x())


def test_sequential_slices_keep_their_meaning():
    """Pattern: a pre-ReLU feature tap ``seq[:2]`` of a converted Sequential(conv, bn, relu). Today the ReLU
    is folded into the BN and replaced by an Identity, so the tap returns post-ReLU values."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                        nn.Conv2d(8, 4, 1, bias=False), nn.BatchNorm2d(4)).double()
    seq, eager = _convert_copy(seq)
    assert type(seq[2]) is nn.ReLU, "every child keeps its class and meaning"
    assert "1: conv+bn+relu" in seq.fused_resnet_report.fused
    x = _x()
    for sl in (slice(0, 2), slice(0, 3), slice(1, 3), slice(0, 5), slice(2, 5)):
        for mode in (True, False):
            a, b = seq[sl].train(mode), eager[sl].train(mode)
            inp = x if sl.start == 0 else eager[:sl.start].eval()(x).detach()
            _close(a(inp), b(inp), f"slice {sl}, train={mode}")
    _assert_same_function(seq, eager, x)
    # A Sequential edited after convert() still computes what it holds.
    seq.append(nn.ReLU())
    eager.append(nn.ReLU())
    _assert_same_function(seq, eager, x)


def test_unknown_modules_are_reported_with_the_reason():
    model, _ = _convert_copy(_small_resnet(block=ScaledBasicBlock))
    reasons = " ".join(model.fused_resnet_report.skipped)
    assert "forward" in reasons and "ScaledBasicBlock" in reasons, reasons


def test_known_models_still_fuse_everything():
    """The builders' own models and the reference ones: every pattern fused, nothing skipped."""
    torch.manual_seed(0)
    model = fused_resnet.convert(ref.build("resnet50", num_classes=5))
    report = model.fused_resnet_report
    assert len(report.fused) == 1 + 16 and not report.skipped, str(report)
    built = fused_resnet.resnet18(num_classes=5)
    assert not built.fused_resnet_report.skipped


def test_torchvision_classes_are_recognised_by_identity(monkeypatch):
    """torchvision's classes are known by their forward functions (looked up in an imported torchvision),
    never by name: a look-alike class named Bottleneck with another forward is not fused."""
    import sys
    import types

    from fused_resnet.models import convert as convert_mod

    fake = types.ModuleType("torchvision.models.resnet")

    class Bottleneck(ref.Bottleneck):  # stands in for torchvision's class: same children, its own forward
        def forward(self, x):
            return ref.Bottleneck.forward(self, x)

    Bottleneck.__module__ = fake.__name__
    fake.Bottleneck, fake.BasicBlock, fake.ResNet = Bottleneck, ref.BasicBlock, ref.ResNet
    monkeypatch.setitem(sys.modules, "torchvision.models.resnet", fake)
    model = _small_resnet(block=Bottleneck)
    fused_resnet.convert(model)
    assert any(f.startswith("layer1.0: Bottleneck") for f in model.fused_resnet_report.fused), \
        "a class of the imported torchvision.models.resnet is known"

    class Bottleneck(ref.Bottleneck):  # noqa: F811 - same name, other module, own forward: unknown
        def forward(self, x):
            return ref.Bottleneck.forward(self, x) * 2

    model = _small_resnet(block=Bottleneck)
    fused_resnet.convert(model)
    assert any(s.startswith("layer1.0:") for s in model.fused_resnet_report.skipped)


def test_convert_is_idempotent():
    model, eager = _convert_copy(_small_resnet())
    fused_resnet.convert(model)
    assert not model.fused_resnet_report.skipped
    _assert_same_function(model, eager, _x())


def test_bad_argument():
    with pytest.raises(TypeError, match="nn.Module"):
        fused_resnet.convert(3)


# ---------------------------------------------------------------------------------------------------------
# torch's own converter (section 5): nn.SyncBatchNorm.convert_sync_batchnorm, as torchvision's reference
# training script calls for --sync-bn. Outside torch.distributed, SyncBatchNorm is plain BatchNorm.


def test_torch_sync_batchnorm_converter_on_a_fused_model():
    """Pattern: nn.SyncBatchNorm.convert_sync_batchnorm(fused_model). Today a fused builder model raises
    AttributeError ('SyncBatchNorm' object has no attribute 'forward_maxpool')."""
    torch.manual_seed(0)
    eager = ref.build("resnet18", num_classes=5).double()
    fused = fused_resnet.resnet18(num_classes=5).double()
    fused.load_state_dict(eager.state_dict())
    fused = nn.SyncBatchNorm.convert_sync_batchnorm(fused)
    assert isinstance(fused.layer1[0].bn1, nn.SyncBatchNorm)
    _assert_same_function(fused, eager, _x())


def test_torch_sync_batchnorm_converter_on_a_converted_sequential():
    """Pattern: the same converter on a convert()ed Sequential(conv, bn, relu). Today the ReLU (folded into
    the BN, then replaced by an Identity) is silently lost."""
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()).double()
    eager = copy.deepcopy(seq)
    seq = nn.SyncBatchNorm.convert_sync_batchnorm(fused_resnet.convert(seq))
    _assert_same_function(seq, eager, _x())


def test_torch_sync_batchnorm_converter_refuses_a_bn_with_fused_relu():
    """A user's own BatchNormAct2d(fuse_relu=True) computes relu(bn(x)); a plain SyncBatchNorm in its place
    would drop the ReLU, so torch's converter stops with an error naming fused_resnet's converter."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1), fused_resnet.BatchNormAct2d(4, fuse_relu=True))
    with pytest.raises(TypeError, match="fused_resnet.convert_sync_batchnorm"):
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    # Without a fused ReLU the swap is exact, and allowed.
    plain = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(fused_resnet.BatchNormAct2d(4)))
    assert type(plain[0]) is nn.SyncBatchNorm
    # fused_resnet's own converter keeps the module (and its ReLU) and turns synchronisation on.
    fused_resnet.convert_sync_batchnorm(model)
    assert type(model[1]) is fused_resnet.BatchNormAct2d and model[1].sync and model[1].fuse_relu


def test_cifar_style_stem_is_fused():
    """A common edit: a 3x3 stride-1 stem and maxpool replaced by nn.Identity (CIFAR). Still fused: the pool is
    called as a module, the stem's BN + ReLU run fused."""
    model = _small_resnet()
    model.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False).double()
    model.maxpool = nn.Identity()
    model, eager = _convert_copy(model)
    assert any(f.startswith("(model): stem") for f in model.fused_resnet_report.fused)
    _assert_same_function(model, eager, _x())


def test_convert_keeps_what_a_fused_batchnorm_already_is():
    """A BatchNormAct2d of the user's own keeps its fused ReLU and its backend through convert()."""
    bn = fused_resnet.BatchNormAct2d(4, fuse_relu=True, backend="eager")
    seq = nn.Sequential(nn.Conv2d(3, 4, 1), bn, nn.Conv2d(4, 4, 1), fused_resnet.BatchNormAct2d(4, backend="eager"))
    eager = copy.deepcopy(seq).double()
    fused_resnet.convert(seq.double())
    assert bn.fuse_relu and bn.backend == "eager" and seq[3].backend == "eager"
    _assert_same_function(seq, eager, _x())
