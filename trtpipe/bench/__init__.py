"""Benchmarks against the PyTorch way: fixed shapes, real text, device scaling, online load.

Every comparison is measured in one run with the two sides interleaved, because the figures
that count are ratios on a noisy machine; see ``docs/performance.md``.
"""
