"""Training logs: metrics.jsonl and metrics.csv in the run dir, TensorBoard when installed, a tqdm bar.

Rows are written only at log points (every ``log_every`` steps), which are also the only places the
training loop reads values back from the device.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sys
from pathlib import Path
from typing import Any


class MetricLogger:
    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.jsonl = self.run_dir / "metrics.jsonl"
        self.csv = self.run_dir / "metrics.csv"
        if resume_step is None:
            for path in (self.jsonl, self.csv):
                path.unlink(missing_ok=True)
        else:
            self._truncate_after(resume_step)
        self._columns: list[str] | None = self._csv_columns()
        self._tb = _tensorboard_writer(self.run_dir / "tb") if tensorboard else None

    def _truncate_after(self, step: int) -> None:
        """Drop rows logged after the checkpoint we resume from: they will be logged again."""
        if self.jsonl.exists():
            keep = [ln for ln in self.jsonl.read_text().splitlines() if ln.strip() and _row_step(ln) <= step]
            self.jsonl.write_text("".join(ln + "\n" for ln in keep))
        if self.csv.exists():
            rows = list(csv.reader(io.StringIO(self.csv.read_text())))
            if rows:
                header, body = rows[0], rows[1:]
                at = header.index("step") if "step" in header else 0
                body = [r for r in body if r and float(r[at]) <= step]
                buf = io.StringIO()
                csv.writer(buf).writerows([header] + body)
                self.csv.write_text(buf.getvalue())

    def _csv_columns(self) -> list[str] | None:
        if self.csv.exists():
            first = self.csv.read_text().splitlines()[:1]
            if first:
                return next(csv.reader(first))
        return None

    def log(self, row: dict[str, Any]) -> None:
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        with self.jsonl.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if self._columns is None:
            self._columns = list(row)
            with self.csv.open("a", newline="") as f:
                csv.writer(f).writerow(self._columns)
        with self.csv.open("a", newline="") as f:
            csv.writer(f).writerow([row.get(c, "") for c in self._columns])
        if self._tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _row_step(line: str) -> float:
    try:
        return float(json.loads(line).get("step", math.inf))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return math.inf


def _tensorboard_writer(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard is optional (pip install advfast[tb])
        return None
    return SummaryWriter(str(path))


class Progress:
    """tqdm bar over steps with loss, lr, images/s and ETA; silent when disabled."""

    def __init__(self, total: int, initial: int, enabled: bool, desc: str):
        self._bar = None
        if enabled:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                             file=sys.stderr, mininterval=1.0)

    def update(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def show(self, **values) -> None:
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in values.items()}, refresh=False)

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e-2 or abs(v) >= 1e4 else f"{v:.4f}".rstrip("0").rstrip(".")
    return str(v)
