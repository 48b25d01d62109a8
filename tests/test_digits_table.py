"""examples/digits_table.py plans its runs from the methods' own declarations (in_digits_table)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "digits_table.py"


def test_dry_run_prints_each_declared_methods_three_commands(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "t"), "--eps", "4/255"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    methods = ["simclr", "moco", "acl", "amoc", "moco-adv", "advcl", "rocl"]  # the table's rows, in order
    assert len(out) == 3 * len(methods)
    for i, m in enumerate(methods):
        train, slf, alf = out[3 * i:3 * i + 3]
        assert f"-m advfast.train --method {m} --dataset digits --device cpu --out {tmp_path / 't' / m} " in train
        assert train.endswith("--overwrite --set seed=0 --no-progress")
        for line, protocol in ((slf, "slf"), (alf, "alf")):
            assert f"--checkpoint {tmp_path / 't' / m} --protocol {protocol} --attacks pgd20 --eps 4/255" in line
    assert not (tmp_path / "t").exists()  # nothing run, nothing written
