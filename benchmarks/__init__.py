"""Microbenchmarks and roofline report of ``aia_kernels``.

``python -m benchmarks.run --help`` (the runner) and ``pytest benchmarks --benchmark-only``
(the pytest-benchmark suite) share the cases in :mod:`benchmarks.cases`, the timers in
:mod:`benchmarks.timing` and the bytes model in :mod:`benchmarks.bytes_model`.
"""
