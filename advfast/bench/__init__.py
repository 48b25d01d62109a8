"""Benchmarks of whole training iterations: throughput per method, eager vs fast, the ablation, MFU.

    advfast.bench.configs   the engine configurations ("eager", "fast", "fast-no-<optimisation>")
    advfast.bench.harness   Session (a Trainer + its batch source for one method x config), measure, run_all
    advfast.bench.flops     analytic FLOP counting (layer hooks; torch's flop counter) and the pass model
    advfast.bench.device    device name and versions, sync, peak memory, measured matmul rate
    advfast.bench.report    Markdown table and JSON document
    advfast.bench.cli       the advfast-bench command

The kernel benchmarks (ops, losses, augmentation) live in bench/ as pytest-benchmark suites.
"""
