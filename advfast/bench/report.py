"""The benchmark report: a Markdown table for people and a JSON document for tools.

JSON (``build_document``): {"environment": device name, torch/CUDA/cuDNN versions, date, ...,
"matmul_peak": the measured matmul rate MFU divides by, "sizes", "epoch_images", "rows": one per
method x config, "skipped": rows not run and why}. A row holds the method, config, the switches
that ran, arch/image size/batch/attack/precision, ``step_s`` (median, q1, q3, min, max of the
seconds per iteration over the timed repeats), images_per_s (median; _q1/_q3 from the quartiles),
s_per_epoch (50,000 images), speedup_vs_eager (same method), peak_mem_bytes (GPU only; null on a
CPU), flops_per_iter, forward_flops_per_image, passes_per_image, expected_passes, mfu, final_loss.
"""

from __future__ import annotations

import json
import os


def add_speedups(rows: list[dict]) -> list[dict]:
    """speedup_vs_eager = eager's median seconds per image / this row's (per method); None without eager."""
    eager = {r["method"]: r["step_s"]["median"] / r["batch_size"] for r in rows if r["config"] == "eager"}
    fast = {r["method"]: r["step_s"]["median"] / r["batch_size"] for r in rows if r["config"] == "fast"}
    for r in rows:
        per_image = r["step_s"]["median"] / r["batch_size"]
        r["speedup_vs_eager"] = eager[r["method"]] / per_image if r["method"] in eager else None
        r["fast_over_this"] = (per_image / fast[r["method"]]) if r["method"] in fast and r["config"] != "fast" \
            else None
    return rows


def _mem(nbytes) -> str:
    return "-" if nbytes is None else f"{nbytes / 2**30:.2f} GiB"


def _speed(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


def markdown_table(doc: dict) -> str:
    env, peak = doc["environment"], doc["matmul_peak"]
    lines = [
        f"advfast-bench on {env['device']} | torch {env['torch']} (CUDA {env['cuda'] or '-'}) | {env['date']} | "
        f"sizes: {doc['sizes']['name']} | MFU vs measured {peak['dtype']} matmul "
        f"{peak['flops_per_s'] / 1e12:.2f} TFLOP/s",
        "",
        "| method | config | arch | batch | attack | images/s (IQR) | s/epoch | vs eager | fast is x faster "
        "| peak mem | MFU |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in doc["rows"]:
        mfu = "-" if r.get("mfu") is None else f"{100 * r['mfu']:.1f}%"
        lines.append(
            f"| {r['method']} | {r['config']} | {r['arch']} | {r['batch_size']} | {r['attack']} | "
            f"{r['images_per_s']:.1f} ({r['images_per_s_q1']:.1f}-{r['images_per_s_q3']:.1f}) | "
            f"{r['s_per_epoch']:.1f} | {_speed(r.get('speedup_vs_eager'))} | {_speed(r.get('fast_over_this'))} | "
            f"{_mem(r['peak_mem_bytes'])} | {mfu} |")
    for s in doc.get("skipped", []):
        lines.append(f"\n{s['method']} {s['config']}: not run ({s['reason']})")
    if env["device_type"] != "cuda":
        lines.append("\nCPU run: peak memory is not measured on a CPU; MFU is against the fp32 matmul rate. "
                     "Tiny sizes: these numbers say nothing about GPU speed.")
    return "\n".join(lines)


def write_json(doc: dict, path: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)
