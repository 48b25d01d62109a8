"""The pseudo-label generator's command line::

    python -m advfast.pseudo_labels --encoder RUN_DIR --dataset cifar10 --out FILE
"""

from __future__ import annotations

import argparse
import os
import pickle
import sys
from typing import Sequence

from advfast.pseudo_labels.files import DEFAULT_KS
from advfast.pseudo_labels.generate import build_pseudo_labels


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, not the usage block
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        sys.exit(2)


def main(argv: Sequence[str] | None = None) -> int:
    p = _OneLineParser(prog="python -m advfast.pseudo_labels",
                       description="ClusterFit pseudo labels for AdvCL: k-means over encoder features.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--encoder", help="advfast run dir holding encoder.safetensors + encoder.json")
    src.add_argument("--raw-pixels", action="store_true", help="cluster raw pixels (demo-only stand-in)")
    p.add_argument("--dataset", required=True)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--download", action="store_true")
    p.add_argument("--image-size", type=int, default=None,
                   help="as advfast-train --image-size (digits, imagefolder, synthetic): use the training run's size")
    p.add_argument("--out", required=True, help="output .safetensors (a .json sidecar is written beside it)")
    p.add_argument("--ks", default=",".join(map(str, DEFAULT_KS)), help="comma-separated cluster counts")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--kmeans", choices=("torch", "sklearn"), default="torch")
    p.add_argument("--max-iter", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--rebuild", action="store_true", help="ignore a matching cache")
    a = p.parse_args(argv)
    from types import SimpleNamespace

    from advfast.data import load_dataset
    from advfast.data.build import dataset_kwargs

    try:
        ks = [int(k) for k in a.ks.split(",") if k.strip()]
    except ValueError:
        p.error(f"--ks must be comma-separated integers such as 2,10,50, got {a.ks[:80]!r}")
    if not 0 <= a.seed < 2**63:
        p.error(f"--seed must be a non-negative integer below 2**63, got {a.seed}")
    if a.max_iter < 1:
        p.error(f"--max-iter must be at least 1, got {a.max_iter}")
    size_kw = dataset_kwargs(SimpleNamespace(dataset=a.dataset, image_size=a.image_size))
    try:
        ds = load_dataset(a.dataset, root=a.data_dir, split="train", download=a.download, **size_kw)
        build_pseudo_labels(ds, a.out, encoder=a.encoder, source="raw_pixels" if a.raw_pixels else "encoder",
                            ks=ks, seed=a.seed, kmeans_backend=a.kmeans, device=a.device, max_iter=a.max_iter,
                            rebuild=a.rebuild, log=lambda m: print(m, file=sys.stderr))
    except (ValueError, TypeError, OSError, pickle.UnpicklingError) as e:  # bad input: one line, exit 2
        if os.environ.get("ADVFAST_DEBUG"):
            raise
        print(f"{p.prog}: error: {(str(e).splitlines() or [type(e).__name__])[0]}", file=sys.stderr)
        return 2
    print(a.out)
    return 0
