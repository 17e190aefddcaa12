"""The report's claims: the plain sentences say what the claims table says."""
from __future__ import annotations

from pathlib import Path

import pytest

from dvlib.reporting.claims import claims_frame, headline, verdict

REPORT = Path(__file__).resolve().parents[1] / "reports" / "quick-pad_ufes_20" / "results"


@pytest.mark.skipif(not (REPORT / "restore_predictions.csv.gz").exists(), reason="needs the committed report")
def test_headline_verdicts_are_the_claims_tables():
    """One Holm family for both: the sentences for a restore mode carry the table's verdicts and p-values."""
    df = claims_frame(REPORT, "accuracy", n_boot=50)
    assert len(df) == 12 and df["t p (Holm)"].notna().all()
    for mode in ("none", "recalibrate", "finetune_epoch"):
        lines = headline(REPORT, "accuracy", mode).splitlines()[1:]
        rows = df[df["restore"] == mode]
        assert len(lines) == len(rows) == 4
        for line, (_, r) in zip(lines, rows.iterrows()):
            assert line.endswith(f": {verdict(r)}.") and f"Holm p={r['t p (Holm)']:.2g}" in line, (line, r.to_dict())
