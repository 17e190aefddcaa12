"""Statistics behind the report's claims: intervals, paired comparisons, variance components.

Every comparison is between models evaluated on the *same* test images, so comparisons are paired.
Replicates are (split_seed, train_seed) cells; test images belong to patients, so resampling within a
test set is by patient (cluster bootstrap), never by image. Pure numpy/scipy; errors raise DvlibError.
"""
from __future__ import annotations

from dvlib.stats.bootstrap import (METRICS, bootstrap_metric, metric_from_confusion, paired_bootstrap,
                                   paired_bootstrap_replicates, per_patient_confusion)
from dvlib.stats.replicates import (Comparison, Interval, SignTest, holm, mean_interval, paired_t, sign_test,
                                    variance_components)

__all__ = ["METRICS", "Comparison", "Interval", "SignTest", "bootstrap_metric", "holm", "mean_interval",
           "metric_from_confusion", "paired_bootstrap", "paired_bootstrap_replicates", "paired_t",
           "per_patient_confusion", "sign_test", "variance_components"]
