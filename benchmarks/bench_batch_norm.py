"""Microbenchmarks of the fused BatchNorm family at every BatchNorm shape of ResNet-50 (batch 256, 224x224,
bf16, channels_last): forward (statistics + apply) and backward (reduce + elementwise) of the fused module per
backend, against eager ATen (nn.BatchNorm2d + add + ReLU, torchvision's sequence) and optionally
torch.compile of it; plus each fused kernel alone. GB/s against the device copy bandwidth of the same run.
The cases live in fused_resnet/benchmarking/micro.py (``fused-resnet micro`` runs the same ones without pytest).

    pytest benchmarks/bench_batch_norm.py [--providers triton,cuda,eager,compile] [--results-json F]
"""
from __future__ import annotations

import pytest

from fused_resnet.benchmarking import micro
from fused_resnet.benchmarking.stats import summarize
from fused_resnet.benchmarking.timing import calibrate, synchronize

ROUNDS = 20
SHAPE_IDS = [name for name, *_ in micro.RESNET50_BN_SHAPES]


def _record(benchmark, env, case: micro.Case):
    device = env.cfg.device
    k = calibrate(case.fn, device)

    def round_of_k_calls():
        # k back-to-back calls and one device synchronisation: a round times the device's work (launch gaps
        # amortised over k), with pytest-benchmark's own timer and public API.
        for _ in range(k):
            case.fn()
        synchronize(device)

    benchmark.extra_info["calls_per_round"] = k
    benchmark.pedantic(round_of_k_calls, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the function ran once, untimed
        return
    seconds = summarize(t / k for t in benchmark.stats.stats.data)
    row = micro.result_row(case, seconds, env.roofs(case.tensor_bytes))
    benchmark.extra_info.update(time_us_median=row["time_us"]["median"], gb_per_s=row["gb_per_s"],
                                moved_bytes=row["moved_bytes"])
    env.results.append(row)


def _skip_unless_runnable(env, provider):
    if provider not in env.providers:
        pytest.skip(f"provider {provider!r} not selected (--providers)")
    reason = micro.skip_reason(provider, env.cfg)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("direction", micro.PASSES)
@pytest.mark.parametrize("provider", micro.PROVIDERS)
@pytest.mark.parametrize("order", range(len(SHAPE_IDS)), ids=SHAPE_IDS)
def test_bn_act(benchmark, bench_env, order, provider, direction):
    _skip_unless_runnable(bench_env, provider)
    _record(benchmark, bench_env, micro.module_case(bench_env.cfg, order, provider, direction))


@pytest.mark.parametrize("kernel", micro.KERNELS)
@pytest.mark.parametrize("provider", micro.FUSED)
@pytest.mark.parametrize("order", range(len(SHAPE_IDS)), ids=SHAPE_IDS)
def test_fused_kernel(benchmark, bench_env, order, provider, kernel):
    """Each pass alone, to see which one falls short of the copy bandwidth."""
    _skip_unless_runnable(bench_env, provider)
    _record(benchmark, bench_env, micro.kernel_case(bench_env.cfg, order, provider, kernel))
