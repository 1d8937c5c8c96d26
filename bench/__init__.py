"""The benchmarks behind BENCHMARKS.md, each script named by the question it answers.

Run from the repository root: `python -m bench.<script> --help`. What scripts share lives in
bench.harness (running a command, simulating a pair into a store, the standard error of a
balanced accuracy, result files); figures go to bench/results/<script>.json.
"""
