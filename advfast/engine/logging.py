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

from advfast.io import atomic_write_text


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
        """Drop rows logged after the checkpoint we resume from (they will be logged again) and any line
        torn by a kill. metrics.jsonl is the record; metrics.csv is rebuilt from it. Both are rewritten
        atomically: a kill during the rewrite leaves the old files, never half of them."""
        rows = []
        if self.jsonl.exists():
            for line in self.jsonl.read_text(encoding="utf-8", errors="replace").splitlines():
                row = _parse_row(line)  # steps only grow: a repeated or out-of-order row is dropped
                if row is not None and row["step"] <= step and (not rows or row["step"] > rows[-1]["step"]):
                    rows.append(row)
        atomic_write_text(self.jsonl, "".join(json.dumps(r) + "\n" for r in rows))
        header = self._csv_columns() or (list(rows[0]) if rows else None)
        if header is None:
            self.csv.unlink(missing_ok=True)
            return
        buf = io.StringIO()
        writer = csv.writer(buf)
        writer.writerow(header)
        for row in rows:
            writer.writerow([row.get(c, "") for c in header])
        atomic_write_text(self.csv, buf.getvalue())

    def _csv_columns(self) -> list[str] | None:
        if self.csv.exists():
            first = self.csv.read_text(encoding="utf-8", errors="replace").splitlines()[:1]
            if first:
                columns = next(csv.reader(first))
                return columns if "step" in columns else None
        return None

    def log(self, row: dict[str, Any]) -> None:
        """Append one row to each file in a single write: a kill leaves at most a torn last line, which
        a resume drops."""
        row = {k: (v if not isinstance(v, float) or math.isfinite(v) else str(v)) for k, v in row.items()}
        _append(self.jsonl, json.dumps(row) + "\n")
        buf = io.StringIO()
        if self._columns is None:
            self._columns = list(row)
            csv.writer(buf).writerow(self._columns)
        csv.writer(buf).writerow([row.get(c, "") for c in self._columns])
        _append(self.csv, buf.getvalue())
        if self._tb is not None:
            step = row["step"]
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def _parse_row(line: str) -> dict[str, Any] | None:
    """A whole metrics.jsonl row, or None for a torn or foreign line."""
    try:
        row = json.loads(line)
    except ValueError:
        return None
    if not isinstance(row, dict) or not isinstance(row.get("step"), int) or isinstance(row["step"], bool):
        return None
    return row


def _append(path: Path, text: str) -> None:
    with path.open("a", encoding="utf-8", newline="") as f:
        f.write(text)


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
