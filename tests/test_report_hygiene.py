"""What a reader sees: HTML titled after the notebook without test markers, tables with labels (no
internal ids, no NaN cells, no integer index), figures that say what their bands are and whose
legends neither cover data nor name what is not drawn."""
from __future__ import annotations

import re
from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
import pytest

from dvlib import reporting
from dvlib.reporting.tables import NONE, model_label, save_table

matplotlib.use("Agg")
ROOT = Path(__file__).resolve().parents[1]
REPORT = ROOT / "reports" / "quick-pad_ufes_20" / "results"
FEDERATED = ROOT / "reports" / "seeds-pad_ufes_20-iid" / "results"
needs_report = pytest.mark.skipif(not (REPORT / "layer_cosine.csv").exists(), reason="needs the committed report")


def _notebook(path: Path, title: str | None = None) -> Path:
    import nbformat

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# 03 · Merge the hospitals' models\n\ntext"),
                nbformat.v4.new_code_cell("# NBVAL_CHECK_OUTPUT\nprint('checked')\n  # NBVAL_IGNORE_OUTPUT")]
    if title:
        nb.metadata["title"] = title
    nbformat.write(nb, str(path))
    return path


def test_html_is_titled_after_the_notebook_without_test_markers(tmp_path):
    from dvlib.notebook_step import to_html

    nb = _notebook(tmp_path / "03_merge.ipynb")
    before = nb.read_text()
    html = to_html(nb).read_text()
    assert re.search(r"<title>(.*?)</title>", html).group(1) == "03 · Merge the hospitals' models"
    assert "NBVAL" not in html and "checked" in html
    assert nb.read_text() == before  # the notebook keeps its markers for nbval
    html = to_html(_notebook(tmp_path / "x.ipynb", title="Set in the metadata")).read_text()
    assert re.search(r"<title>(.*?)</title>", html).group(1) == "Set in the metadata"


def test_model_ids_read_as_labels():
    assert model_label("restored_data_vector_finetune_epoch") == "Data Vector merge + 1 epoch per hospital"
    assert model_label("restored_params_mean_recalibrate") == "Params Mean merge + BN recalibrate"
    assert model_label("merged_data_vector") == "Data Vector merge"
    assert model_label("restored_pretrained_none") == "Pretrained (no merge) + none"
    assert (model_label("hospital_3"), model_label("full")) == ("hospital 3", "Full Training")


def test_save_table_writes_empty_cells_as_a_dash_and_keeps_the_index_as_columns(tmp_path):
    t = pd.DataFrame({"part": ["1", "2"], "column": ["a", "b"], "paper": [1.5, np.nan]}).set_index(["part", "column"])
    save_table(t, tmp_path / "t")
    md = (tmp_path / "t.md").read_text()
    assert "nan" not in md.lower() and f"| {NONE}" in md
    assert list(pd.read_csv(tmp_path / "t.csv").columns) == ["part", "column", "paper"]


@needs_report
def test_tables_show_labels_no_nan_and_no_integer_index():
    tables = {"paper": reporting.paper_table(REPORT, "accuracy"), "ablation": reporting.ablation_table(REPORT),
              "finetune": reporting.finetune_table(REPORT), "methods": reporting.method_table(REPORT),
              "bn": reporting.bn_policy_table(REPORT), "figure2": reporting.figure2_summary(REPORT),
              "claims": reporting.claims_table(REPORT, "accuracy"), "shards": reporting.shard_table(REPORT),
              "variance": reporting.variance_table({"quick": REPORT}),
              "comparison": reporting.paper_comparison(REPORT, "pad_ufes_20"),
              "provenance": reporting.provenance_table(REPORT)}
    for name, t in tables.items():
        assert not t.isna().any().any(), name
        assert any(t.index.names) and not isinstance(t.index, pd.RangeIndex), name
        ids = [str(v) for v in t.index.get_level_values(-1)] + [str(c) for c in t.columns]
        assert not [v for v in ids if re.fullmatch(r"[a-z]+(_[a-z0-9]+)+", v)], (name, ids)
    assert "Data Vector merge + 1 epoch per hospital" in tables["figure2"].index
    assert "merged as if they were weights" in tables["bn"].index


def _legend_inside(ax) -> bool:
    fig = ax.figure
    fig.canvas.draw()
    legends = [c for c in [ax.get_legend(), *fig.legends] if c is not None]
    box = ax.get_window_extent()
    return any(lg.get_window_extent().overlaps(box) for lg in legends)


@needs_report
def test_figure2_and_lambda_say_their_bands_and_keep_the_legend_off_the_data():
    fig = reporting.plot_layer_cosine(REPORT)
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "shaded: ±1 sd over replicates" in labels and not _legend_inside(ax)
    fig = reporting.plot_lambda_curve(REPORT)
    ax = fig.axes[0]
    assert any("mean ± 1 sd over 6 replicates" in t.get_text() for t in ax.get_legend().get_texts())
    assert not _legend_inside(ax)


@pytest.mark.skipif(not (FEDERATED / "federated_eval.csv").exists(), reason="needs the committed federated run")
def test_bytes_axis_is_labelled_at_the_data():
    from dvlib.studies.federated.report import federated_rows, plot_bytes

    fig = plot_bytes(FEDERATED)
    mb = sorted(set(federated_rows(FEDERATED)["bytes_up_per_hospital"] / 1e6))
    ticks = fig.axes[0].get_xticks()
    assert len(ticks) >= 2 and all(min(abs(t / v - 1) for v in mb) < 1e-9 for t in ticks)
    labels = [t.get_text() for t in fig.axes[2].get_xticklabels()]
    assert labels == [f"{t:.3g}" for t in ticks]


@needs_report
def test_privacy_utility_legend_names_only_what_is_drawn():
    from dvlib.studies.privacy.figures import plot_privacy_utility

    fig = plot_privacy_utility(REPORT)
    drawn = {}
    for ax in fig.axes:
        for artist in ax.lines:
            y = np.asarray(artist.get_ydata(), dtype=float)
            if np.isfinite(y).any():
                drawn.setdefault(artist.get_label(), artist)
        for c in ax.containers:
            drawn.setdefault(c.get_label(), c)
    labels = [t.get_text() for lg in fig.legends for t in lg.get_texts()]
    assert labels and all(lab in drawn for lab in labels), (labels, list(drawn))
    hosp = next(a for a in fig.axes[0].lines if a.get_label().startswith("hospitals' own DP models"))
    assert hosp.get_marker() == "D" and hosp.get_markerfacecolor() == "none" and hosp.get_zorder() > 2


@needs_report
def test_a_missing_cell_reads_as_a_dash(tmp_path):
    rs = pd.read_csv(REPORT / "restore_eval.csv")
    rs[~((rs["method"] == "dare") & (rs["restore"] == "none"))].to_csv(tmp_path / "restore_eval.csv", index=False)
    ft = pd.read_csv(REPORT / "finetune_eval.csv")
    ft[~((ft["model"] == "hospital_1") & (ft["eval_on"] == "hospital_2"))].to_csv(tmp_path / "finetune_eval.csv",
                                                                                  index=False)
    ablation = reporting.ablation_table(tmp_path, "accuracy")
    assert ablation.loc["DARE", "none"] == NONE and ablation.loc["DARE", "BN recalibrate"] != NONE
    finetune = reporting.finetune_table(tmp_path)
    assert finetune.loc["hospital 1's model", "Part 2"] == NONE and not finetune.isna().any().any()


def test_no_committed_report_names_a_folder_of_the_machine():
    # a reader of reports/ sees project-relative paths only (the pipeline injects "" for default folders)
    from dvlib.runs import project_root

    root = project_root()
    machine = [f"{root.parent}/", f"{Path.home()}/", "/tmp/"]
    files = [p for ext in ("ipynb", "html", "json", "md") for p in (root / "reports").rglob(f"*.{ext}")]
    assert files, "no committed reports found"
    bad = {str(p.relative_to(root)): m for p in files for m in machine if m in p.read_text(errors="replace")}
    assert not bad, bad
