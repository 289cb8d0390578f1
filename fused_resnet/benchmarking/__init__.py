"""Measurement code shared by ``benchmarks/`` (pytest-benchmark) and the CLI (``fused-resnet bench|micro``):
device-synchronised timing, the device ceilings (copy bandwidth, matmul rate), the microbenchmark cases and the
end-to-end training/inference step."""
