"""End-to-end ResNet training and inference throughput: eager (torchvision, else the in-tree reference with the
same architecture), torch.compile of eager, fused (each backend), and torch.compile of fused, side by side in
one run. The same code as ``fused-resnet bench`` (fused_resnet/benchmarking/e2e.py); this script forwards its
arguments to it.

    python benchmarks/bench_resnet.py                    # CUDA: ResNet-50, batch 256, 224x224, bf16, all variants
    python benchmarks/bench_resnet.py --arch resnet18 --batch 4 --size 64 --variants eager,fused --out DIR
"""
import sys

from fused_resnet.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
