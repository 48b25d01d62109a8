"""advfast-bench: per-method training throughput, eager vs fast (and the ablation), as a table and JSON.

    advfast-bench                                   # every method, eager and fast, sizes for the device
    advfast-bench --methods acl --configs eager,fast,ablation --json bench/results/acl.json

Bad input prints one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import sys

from advfast.bench.configs import ABLATION, expand_configs
from advfast.bench.harness import method_names


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):
        print(f"advfast-bench: error: {message}", file=sys.stderr)
        sys.exit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _OneLineParser(prog="advfast-bench", description=__doc__.split("\n\n")[0])
    names = ",".join(method_names())
    p.add_argument("--methods", default=names, help=f"comma-separated methods (default: all of {names})")
    p.add_argument("--configs", default="eager,fast",
                   help="comma-separated configs: eager, fast, ablation (= " + ",".join(ABLATION) + "), "
                        "fast-graphs (fast with CUDA-graph attacks instead of compile) or any of those")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the results as JSON to FILE")
    p.add_argument("--markdown", metavar="FILE", default=None, help="also write the table to FILE")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N")
    p.add_argument("--size", default="auto", help="auto (full on a GPU, tiny on a CPU), full or tiny")
    p.add_argument("--steps", type=int, default=None, help="timed iterations per repeat (default: the size's)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats; the table shows their median")
    p.add_argument("--warmup", type=int, default=None, help="untimed iterations before timing")
    p.add_argument("--workers", type=int, default=None,
                   help="DataLoader workers of the CPU augmentation path (default 4 at full size, as the official codes)")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import dataclasses

        from advfast.bench.harness import check_methods, pick_sizes
        from advfast.engine.precision import resolve_device

        methods = check_methods(args.methods)
        configs = expand_configs(args.configs)
        device = resolve_device(args.device)
        sizes = pick_sizes(args.size, device)
        changes = {}
        for name, low in (("steps", 1), ("repeats", 1), ("warmup", 0), ("workers", 0)):
            value = getattr(args, name)
            if value is not None:
                if value < low:
                    raise ValueError(f"--{name} must be at least {low}, got {value}")
                changes[name] = value
        sizes = dataclasses.replace(sizes, **changes)
    except ValueError as e:
        print(f"advfast-bench: error: {e}", file=sys.stderr)
        return 2

    from advfast.bench.harness import run_all
    from advfast.bench.report import add_speedups, markdown_table, write_json

    doc = run_all(methods, configs, sizes, device, log=lambda m: print(m, file=sys.stderr, flush=True))
    add_speedups(doc["rows"])
    table = markdown_table(doc)
    print(table)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.json:
        write_json(doc, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
