"""fusekit-bench: the benchmark CLI (``fusekit-bench`` / ``python -m fusekit.bench``).

harness.py measures (inputs, float64 check, timing, ceilings), depthwise.py holds the
depthwise-convolution cases and baselines, report.py prints and writes the rows, cli.py parses
the command line.
"""
