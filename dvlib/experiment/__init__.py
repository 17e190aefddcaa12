"""The simulation of the paper's protocol over a run folder; the notebooks and ``dvlib run`` call it.

Each step (:mod:`dvlib.experiment.steps`) runs, for every replicate and simulated hospital, the very
stage that a real site or coordinator runs (:mod:`dvlib.site`, :mod:`dvlib.coordinator`).
"""
from __future__ import annotations

from pathlib import Path

from dvlib.experiment.cache import reset_caches
from dvlib.experiment.parallel import finetune_devices
from dvlib.experiment.restoring import restored_tag, step_restore
from dvlib.experiment.session import Replicate, dataset_index, replicate
from dvlib.experiment.steps import (ALL_METHODS, LAMBDAS, finetune_one, finetune_table, finetune_targets,
                                    step_bn_policy, step_finetune, step_lambda, step_merge, step_similarity,
                                    step_split)
from dvlib.experiment.verify import split_checks, theta, verify_merge, verify_recalibration
from dvlib.files import load_model, load_vector
from dvlib.runs import Run, open_run, project_root


def figures_dir(run: Run, figures: str = "") -> Path:
    """Where a run's figures go: ``figures`` if given, else ``figures/<run>/`` at the project root."""
    d = Path(figures) if figures else project_root() / "figures" / run.name
    d.mkdir(parents=True, exist_ok=True)
    return d


__all__ = ["Run", "open_run", "project_root", "figures_dir", "Replicate", "replicate", "dataset_index",
           "reset_caches", "finetune_devices", "ALL_METHODS", "LAMBDAS", "finetune_one", "finetune_table",
           "finetune_targets", "restored_tag", "step_split", "step_finetune", "step_merge", "step_lambda",
           "step_bn_policy", "step_restore", "step_similarity", "split_checks", "theta", "verify_merge",
           "verify_recalibration", "load_model", "load_vector"]
