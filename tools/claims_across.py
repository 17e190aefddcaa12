"""The claims across datasets (issue 26): `make report-across`.

Reads ``run.json``, ``finetune_eval.csv`` and ``restore_eval.csv`` of two or more runs of the same test
design (e.g. the PAD-UFES-20 and the fundus report) and writes ``claims_across.csv`` and
``claims_across.md`` into ``--out``: each claim's paired difference on each dataset with its 95 %
Holm-adjusted t-interval and Holm p (both over the whole family: every run x both metrics x every
claim), a verdict per claim, the paper's numbers beside them (:mod:`dvlib.reporting.across`).

    python tools/claims_across.py reports/quick-pad_ufes_20 reports/quick-odir_fundus --out reports/across
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib.io import DvlibError  # noqa: E402
from dvlib.reporting.across import write_across  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (or their results/ folders)")
    ap.add_argument("--out", required=True, help="folder for claims_across.csv and claims_across.md")
    a = ap.parse_args(argv)
    command = f"python tools/claims_across.py {' '.join(a.runs)} --out {a.out}"
    try:
        for r in a.runs:
            if not Path(r).is_dir():
                raise DvlibError(f"{r}: run folder not found")
        csv_path, md_path = write_across(a.runs, a.out, command)
    except DvlibError as e:
        print(f"claims_across: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {csv_path} and {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
