"""examples/digits_table.py plans its runs from the methods' own declarations (in_digits_table, digits_table_rows)."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "digits_table.py"

# the table's rows in order: row -> (method, extra --set items)
ROWS = {"simclr": ("simclr", ()), "moco": ("moco", ()), "acl": ("acl", ()), "acl-air": ("acl", ("method.air=true",)),
        "acl-rcs": ("acl", ("coreset=rcs",)), "amoc": ("amoc", ()), "moco-adv": ("moco-adv", ()),
        "advcl": ("advcl", ()), "advcl-iphn": ("advcl", ("method.asymmetric=iphn",)), "rocl": ("rocl", ()),
        "dynacl": ("dynacl", ()), "dynacl++": ("dynacl", ("method.post_process=lp-aft",)), "deacl": ("deacl", ())}


def test_dry_run_prints_each_declared_rows_three_commands(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "t"), "--eps", "4/255"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3 * len(ROWS)
    for i, (row, (method, sets)) in enumerate(ROWS.items()):
        train, slf, alf = out[3 * i:3 * i + 3]
        assert f"-m advfast.train --method {method} --dataset digits --device cpu --out {tmp_path / 't' / row} " in train
        extra = "".join(f" --set {s}" for s in sets)
        assert train.endswith(f"--overwrite --set seed=0{extra} --no-progress")
        for line, protocol in ((slf, "slf"), (alf, "alf")):
            assert f"--checkpoint {tmp_path / 't' / row} --protocol {protocol} --attacks pgd20 --eps 4/255" in line
    assert not (tmp_path / "t").exists()  # nothing run, nothing written


def test_rows_are_picked_by_name_and_an_unknown_one_is_refused(tmp_path):
    out = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path), "--methods", "acl-rcs,deacl"],
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 6 and "--set coreset=rcs" in out[0] and "--method deacl" in out[3]
    bad = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--methods", "acl-ari"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown row 'acl-ari'" in bad.stderr and "acl-air" in bad.stderr
