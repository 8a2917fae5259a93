"""The `gemfs` command line: the top floor.

Click commands only; each is a thin layer over ``tools`` (workloads, reports, benchmarks),
``driver`` (the GPU driver) and ``gemfs`` (the memory model, the control protocol and the FUSE
server). Nothing below imports this package (tests/test_layers.py checks it). Run it as
``gemfs`` or ``python -m gemfs_cli``.
"""
