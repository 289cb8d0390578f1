"""Measurement code shared by ``benchmarks/`` (pytest-benchmark) and the CLI (``fused-resnet bench|micro|memory``):
the timers and device ceilings (timing.py), the statistics every timed figure carries (stats.py), the table
formatter, provenance and result document (report.py), the microbenchmark cases, the end-to-end training and
inference step, and the memory accounting."""
