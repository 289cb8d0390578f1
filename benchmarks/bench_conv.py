"""Convolution microbenchmarks at every distinct convolution shape of ResNet-50 (batch 256, bf16,
channels_last): cuDNN alone, cuDNN plus the fused BatchNorm passes, and the fused Triton convolutions, forward
and backward, in TFLOP/s against the matmul rate of the same run. See fused_resnet/benchmarking/conv_micro.py.

    python benchmarks/bench_conv.py [--batch 256] [--shapes layer1,stem] [--out DIR] [--smoke]
"""
import sys

from fused_resnet.benchmarking.conv_micro import main

if __name__ == "__main__":
    sys.exit(main())
