"""Benchmark library behind ``resnet-fused bench`` and the scripts in ``benchmarks/``."""
