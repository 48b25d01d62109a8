"""The digits results table: pre-train every method on scikit-learn's 8x8 digits (real data, no
download), evaluate each with SLF and ALF under PGD-20, and print a Markdown table.

    python examples/digits_table.py --out runs/digits_table

Runs the two user commands, advfast-train and advfast-eval, as subprocesses, exactly as a user would,
on the CPU (--dry-run prints them instead). The rows are the methods that declare
``in_digits_table = True`` (advfast.methods), in registration order, each followed by the rows it declares
with options set (``digits_table_rows``, e.g. ``acl-air``: acl with ``--set method.air=true``); each uses
its digits preset (see `advfast-train --list`); ``--methods`` picks rows. The l_inf budget of the evaluation equals the one the adversarial methods
trained with (--eps, default 8/255: see README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def table_rows() -> dict[str, tuple[str, tuple[str, ...]]]:
    """Row name -> (method, extra --set items): each declared method's own row (in_digits_table), then its
    rows with options (digits_table_rows, e.g. acl with method.air=true), in registration order."""
    from advfast.methods import METHODS

    rows: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, cls in METHODS.items():
        if cls.in_digits_table:
            rows[name] = (name, ())
        for row, sets in cls.__dict__.get("digits_table_rows", {}).items():  # declared per class, not inherited
            rows[row] = (name, tuple(sets))
    return rows


def table_methods() -> tuple[str, ...]:
    return tuple(table_rows())


def train_command(row: str, args) -> list[str]:
    method, sets = table_rows()[row]
    extra = [item for s in sets for item in ("--set", s)]
    return [sys.executable, "-m", "advfast.train", "--method", method, "--dataset", "digits", "--device", args.device,
            "--out", os.path.join(args.out, row), "--overwrite", "--set", f"seed={args.seed}", *extra, "--no-progress"]


def eval_command(method: str, protocol: str, args) -> list[str]:
    run_dir = os.path.join(args.out, method)
    return [sys.executable, "-m", "advfast.eval.cli", "--checkpoint", run_dir, "--protocol", protocol,
            "--attacks", "pgd20", "--eps", args.eps, "--device", args.device, "--seed", str(args.seed),
            "--no-plots", "--out", os.path.join(run_dir, f"eval-{protocol}")]


def run(cmd: list[str], log_path: str) -> float:
    started = time.time()
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        with open(log_path, encoding="utf-8") as log:
            tail = "".join(log.readlines()[-20:])
        sys.exit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return time.time() - started


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/digits_table")
    p.add_argument("--methods", default=",".join(table_methods()),
                   help="comma-separated rows (a method's name, or a row it declares such as acl-air)")
    p.add_argument("--eps", default="8/255", help="l_inf budget of PGD-20 at evaluation (and of ALF training)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    args = p.parse_args()
    known = table_rows()
    unknown = [m for m in args.methods.split(",") if m not in known]
    if unknown:
        p.error(f"unknown row {unknown[0]!r}; choose from {', '.join(known)}")
    if args.dry_run:
        for method in args.methods.split(","):
            for cmd in (train_command(method, args), *(eval_command(method, pr, args) for pr in ("slf", "alf"))):
                print(" ".join(cmd))
        return
    os.makedirs(args.out, exist_ok=True)
    rows = []
    total = time.time()
    for method in args.methods.split(","):
        run_dir = os.path.join(args.out, method)
        train_s = run(train_command(method, args), os.path.join(args.out, f"{method}.train.log"))
        row = {"method": method, "pretrain_s": train_s}
        for protocol in ("slf", "alf"):
            eval_dir = os.path.join(run_dir, f"eval-{protocol}")
            eval_s = run(eval_command(method, protocol, args), os.path.join(args.out, f"{method}.{protocol}.log"))
            with open(os.path.join(eval_dir, "results.json"), encoding="utf-8") as fh:
                res = json.load(fh)
            row[f"{protocol}_sa"] = 100 * res["clean_accuracy"]
            row[f"{protocol}_ra"] = 100 * res["robust_accuracy"]["pgd20"]
            row[f"{protocol}_s"] = eval_s
            row["n_eval"] = res["n_eval"]
        rows.append(row)
        print(f"{method}: SLF {row['slf_sa']:.1f}/{row['slf_ra']:.1f}  ALF {row['alf_sa']:.1f}/{row['alf_ra']:.1f}  "
              f"({row['pretrain_s']:.0f} s pre-training)", file=sys.stderr, flush=True)
    minutes = (time.time() - total) / 60
    table = [f"| method | SLF SA | SLF RA | ALF SA | ALF RA | pre-training (s) |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        table.append(f"| {r['method']} | {r['slf_sa']:.1f} | {r['slf_ra']:.1f} | {r['alf_sa']:.1f} | {r['alf_ra']:.1f} "
                     f"| {r['pretrain_s']:.0f} |")
    text = "\n".join(table) + (f"\n\nSA: clean accuracy, RA: PGD-20 accuracy at l_inf eps {args.eps} (%), on the "
                               f"{rows[0]['n_eval']} digits test images; {minutes:.1f} min in all on {args.device}.\n")
    with open(os.path.join(args.out, "table.md"), "w", encoding="utf-8") as fh:
        fh.write(text)
    with open(os.path.join(args.out, "table.json"), "w", encoding="utf-8") as fh:
        json.dump(rows, fh, indent=2)
    print(text)


if __name__ == "__main__":
    main()
