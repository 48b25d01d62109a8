"""advfast-export: write an advfast-train run's encoder in another code base's checkpoint layout.

    advfast-export --to robustssl runs/acl --out acl_robustssl.pt

Bad input (no run, an encoder the target cannot hold) is one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys

PROG = "advfast-export"
TARGETS = ("robustssl",)


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block
        raise ValueError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, allow_abbrev=False,
                description="Write an advfast-train run's encoder in a published code base's checkpoint layout. "
                            "robustssl: the dual-BN ACL layout GodXuxilie/RobustSSL_Benchmark's "
                            "vanilla_finetuning.py loads with --pretraining DynACL (or ACL).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="an advfast-train run directory (holding encoder.json)")
    p.add_argument("--to", required=True, choices=TARGETS, help="target layout")
    p.add_argument("--out", required=True, metavar="FILE", help="checkpoint file to write (e.g. model.pt)")
    p.add_argument("--bn-branch", default=None,
                   help="BN branch written as the benchmark's 'pgd' branch (default: the run's evaluation branch)")
    return p


def export_main(argv: list[str] | None = None) -> int:
    from advfast.interop.export import export_run_to_robustssl

    try:
        args = build_parser().parse_args(argv)
        path, info = export_run_to_robustssl(args.run_dir, args.out, args.bn_branch)
    except (ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        if os.environ.get("ADVFAST_DEBUG"):
            raise
        text = str(exc).strip()
        print(f"{PROG}: error: {text.splitlines()[0] if text else type(exc).__name__}", file=sys.stderr)
        return 2
    print(f"{PROG}: wrote {path} ({info['arch']}, BN branches normal={info['normal_branch']}, "
          f"pgd={info['pgd_branch']}); fine-tune it with: python vanilla_finetuning.py --pretraining DynACL "
          f"--model {info['model']} --checkpoint {path} --mode ALL --eval-AA --eval-OOD", flush=True)
    return 0


def main() -> None:
    sys.exit(export_main())


if __name__ == "__main__":  # pragma: no cover
    main()
