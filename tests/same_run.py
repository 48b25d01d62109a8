"""Shared by the kill/resume tests of methods with stages (test_method_hooks.py, test_lp_post_stage.py):
a resumed run must be the uninterrupted run, bit for bit."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def metric_rows(out) -> list[dict]:
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a, b, out_a, out_b) -> None:
    """Trainers ``a`` and ``b`` (after fit) hold equal method state and optimiser state, and their runs in
    ``out_a``/``out_b`` logged the same rows (timing excepted)."""
    sa, sb = a.method.state_dict(), b.method.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    oa, ob = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert oa["param_groups"] == ob["param_groups"] and oa["state"].keys() == ob["state"].keys()
    for i in oa["state"]:
        for k, v in oa["state"][i].items():
            assert torch.equal(v, ob["state"][i][k]) if torch.is_tensor(v) else v == ob["state"][i][k]
    ra, rb = metric_rows(out_a), metric_rows(out_b)
    keys = [k for k in ra[0] if k != "images_per_s"]
    assert [[r.get(k) for k in keys] for r in ra] == [[r.get(k) for k in keys] for r in rb]
