"""Tables, claims and figures, made from a run's result files alone (no model files needed)."""
from __future__ import annotations

from dvlib.reporting.claims import claims_frame, claims_table, headline, variance_table
from dvlib.reporting.conclusions import what_this_shows
from dvlib.reporting.figures import plot_confusion, plot_lambda_curve, plot_layer_cosine, plot_shards, plot_training
from dvlib.reporting.tables import (METHOD_LABELS, METRIC_LABELS, PAPER_COLUMNS, RESTORE_LABELS, ablation_table,
                                    bn_policy_table, caption, figure2_summary, finetune_table, load_results,
                                    method_table, paper_comparison, paper_datasets, paper_rows, paper_table,
                                    paper_table_numeric, provenance_text, save_table, shard_table)
from dvlib.reporting.provenance import provenance_table

__all__ = ["claims_frame", "claims_table", "headline", "variance_table", "plot_confusion", "plot_lambda_curve", "plot_layer_cosine",
           "plot_shards", "plot_training", "METHOD_LABELS", "METRIC_LABELS", "PAPER_COLUMNS", "RESTORE_LABELS",
           "ablation_table", "bn_policy_table", "caption", "figure2_summary", "finetune_table", "load_results",
           "method_table", "paper_comparison", "paper_datasets", "paper_rows", "paper_table",
           "paper_table_numeric", "provenance_table", "provenance_text", "save_table", "shard_table",
           "what_this_shows"]
