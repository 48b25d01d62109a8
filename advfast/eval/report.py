"""Evaluation reports: JSON, a Markdown table, and PNG plots (t-SNE, accuracy against eps,
training curves). Plots use matplotlib (Agg) and scikit-learn's t-SNE."""

from __future__ import annotations

import json
import os

import numpy as np

from advfast.io import atomic_write_text


def markdown_table(result: dict) -> str:
    """One row per metric: SA, each attack, the smoothed and corruption results when present."""
    lines = [f"# advfast-eval: {result['protocol'].upper()} on {result['dataset']}", "",
             f"checkpoint: `{result['checkpoint']}`, branch `{result['bn_branch']}`, "
             f"{result['n_eval']} test images", "", "| metric | accuracy (%) |", "| --- | ---: |",
             f"| SA (clean) | {100 * result['clean_accuracy']:.2f} |"]
    for name, acc in result.get("robust_accuracy", {}).items():
        label = "RA (pgd20)" if name == "pgd20" else "AA (autoattack)" if name == "autoattack" else name
        lines.append(f"| {label} | {100 * acc:.2f} |")
    for name, acc in result.get("smoothed", {}).items():
        lines.append(f"| smoothed {name} | {100 * acc:.2f} |")
    corr = result.get("corruptions")
    if corr:
        lines.append(f"| corruptions (mean) | {100 * corr['mean']:.2f} |")
        for name, acc in corr.items():
            if name != "mean" and "/" not in name:
                lines.append(f"| corruption {name} | {100 * acc:.2f} |")
    board = result.get("leaderboard")
    if board:  # --protocol-set robustssl: the row as the RobustSSL leaderboard shows it
        row = board["row"]
        cells = " | ".join("–" if row[k] is None else f"{row[k]:.2f}" for k in ("ra1", "sa1", "ca1"))
        lines += ["", f"RobustSSL leaderboard table `{board['table']}`:", "",
                  "| ra1 (AA) | sa1 (clean) | ca1 (CIFAR-C) |", "| ---: | ---: | ---: |", f"| {cells} |", ""]
        lines.append("comparable with the leaderboard" if board["comparable"] else
                     "not comparable with the leaderboard: " + "; ".join(board["differences"]))
    if result.get("autoattack"):
        aa = result["autoattack"]
        lines += ["", f"AutoAttack: {aa['package']} {aa['version']} (version='{aa['version_setting']}')"]
    if result.get("command"):
        lines += ["", f"command: `{result['command']}`"]
    return "\n".join(lines) + "\n"


def write_report(out_dir: str, result: dict) -> dict[str, str]:
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "results.md")}
    atomic_write_text(paths["json"], json.dumps(result, indent=2, sort_keys=True))
    atomic_write_text(paths["markdown"], markdown_table(result))
    return paths


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tsne(features: np.ndarray, labels: np.ndarray, path: str, title: str, seed: int = 0) -> str:
    from sklearn.manifold import TSNE

    perplexity = float(min(30, max(2, (features.shape[0] - 1) // 3)))
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 6))
    scatter = ax.scatter(emb[:, 0], emb[:, 1], c=labels, cmap="tab10", s=6)
    ax.legend(*scatter.legend_elements(), title="class", fontsize=7, loc="best")
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_eps_curve(curve: dict[float, float], path: str, title: str, scale: float = 255.0) -> str:
    plt = _pyplot()
    eps = sorted(curve)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.plot([e * scale for e in eps], [100 * curve[e] for e in eps], marker="o")
    ax.set_xlabel("l_inf eps (x 1/255)" if scale == 255.0 else "eps")
    ax.set_ylabel("PGD-20 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def read_metrics(path: str) -> list[dict]:
    """Rows of a training run's metrics.jsonl (one JSON object per line; unreadable lines, such as a
    line cut short by a crash, are skipped)."""
    rows = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict):
                rows.append(row)
    return rows


def plot_training_curves(metrics_path: str, path: str, title: str) -> str | None:
    """Each numeric metric of the training log against the step, one panel per metric; None when the
    log holds nothing to plot."""
    rows = read_metrics(metrics_path)
    step_key = "step" if rows and "step" in rows[0] else None
    keys = sorted({k for r in rows for k, v in r.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "epoch")})
    if not rows or not keys or step_key is None:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(keys), 1, figsize=(6, 2.2 * len(keys)), sharex=True, squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        pts = [(r[step_key], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts])
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[-1, 0].set_xlabel("step")
    axes[0, 0].set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
