"""Cells of notebooks/08_privacy.ipynb (the privacy audit), in tools/make_notebooks.py's conventions.

``CELLS`` is the notebook: make_notebooks.py registers it (``NOTEBOOKS["08_privacy"] = CELLS``) and
writes it with the others. Importing this file needs ``make_notebooks`` importable (tools/ on
``sys.path``); when make_notebooks.py runs as a script, it must put itself in ``sys.modules`` under that
name before importing this file, so that this import does not run it a second time.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_notebooks import code, header, md  # noqa: E402

PURPOSE = (
    "A released model can give away whether a patient's image was in its training set: **membership "
    "inference**. This notebook attacks every model the method releases — each hospital's own model, Params "
    "Mean, the data-vector merge before restore, after BN recalibration and after the paper's restore epoch, "
    "Full Training, and Flower's FedAvg model where notebook 07 wrote one — and reports the ROC AUC and the "
    "true-positive rate at 1 % and 0.1 % false-positive rate (what matters to a patient: an attack that is "
    "surely right about a few people is a leak even at AUC 0.5), each with a bootstrap interval over patients. "
    "**Members**: the images a model was trained on (for models trained on every hospital: the union of the "
    "hospitals' training splits, and each hospital's alone); **non-members**: the test images of held-out "
    "patients, the same distribution. The pretrained model, which saw none of these images, is the sanity "
    "check. Then a defence with a guarantee: **differentially private** local fine-tuning (DP-SGD, Opacus) at "
    "a few epsilons, pretrained BatchNorm frozen, followed by the same merge and restores."
)

CELLS = header(
    "08 · Privacy audit: what the released models say about the patients",
    PURPOSE,
    "the model files of notebooks 02-04 (and notebook 07's `models/fedavg*.safetensors`, if any).",
    "`results/privacy_audit.csv`, `results/privacy_roc.csv.gz`, `results/dp_eval.csv`, `results/dp_audit.csv`, "
    "`results/dp_history.csv`, `results/privacy_table_*.{csv,md}`, `results/dp_table.{csv,md}`, "
    "`figures/<run>/privacy_roc.{png,pdf}`, `figures/<run>/privacy_utility.{png,pdf}`; the DP models under "
    "`models/dp_eps<epsilon>_<trainable>/`.",
    extra_params='epsilons: list = [1.0, 4.0, 8.0]  # DP-SGD privacy budgets, each finite and > 0\n'
                 'delta: float = None  # DP-SGD delta at every hospital; None means 1/n (n: its training images); must be < 2/n\n'
                 'dp_trainable: str = "last_stages"  # what DP-SGD trains: all_but_bn | last_stages | head (BatchNorm always frozen)\n'
                 'dp_train_seeds: list = []  # training seeds DP runs for (every split seed); empty means the first one only\n'
                 'n_boot: int = 1000  # bootstrap resamples (whole patients) per interval',
) + [
    md("## The attack, in a few lines\nEvery image gets a score, higher meaning \"was a training image\"; how well "
       "the scores separate members from non-members is the leak. From the model's probability of the true class "
       "alone: the **loss attack** (Yeom et al. 2018) scores `-loss`; the **reference attack** (Watson et al. 2022) "
       "scores how much lower the loss is than under a reference model that saw neither set, here the pretrained "
       "model (its new head is random, seeded alike at every hospital), which removes how hard an image is anyway. "
       "No shadow models: these are weak attacks, and a stronger one (LiRA) can only find more. For the first "
       "replicate's data-vector merge, on all training images against all test images:"),
    code("import numpy as np\n\n"
         "from dvlib.studies.privacy import attack as privacy\n"
         "from dvlib.studies.privacy.dp_steps import dp_file_summary, step_dp\n"
         "from dvlib.studies.privacy.audit import audit_seed, per_image_losses, step_privacy_audit\n"
         "from dvlib.studies.privacy.report import (dp_caption, dp_table, per_hospital_table, privacy_caption, privacy_detail_table,\n"
         "                                     privacy_table)\n"
         "from dvlib.studies.privacy.figures import plot_privacy_utility, plot_roc\n"
         "from dvlib.studies.privacy.summary import privacy_summary\n\n"
         "s, t = R.replicates[0]\n"
         "rep = ex.replicate(R, s, t)\n"
         "images = per_image_losses(rep, rep.model_from(ex.load_model(R.model_path(s, t, \"merged_data_vector\")).state))\n"
         "reference = per_image_losses(rep, rep.pretrained_model())   # the same images, the same order\n"
         "loss = -np.log(np.clip(images[\"p_true\"], 1e-12, 1))         # loss = -log p_true (no log 0)\n"
         "loss_ref = -np.log(np.clip(reference[\"p_true\"], 1e-12, 1))\n"
         "score = loss_ref - loss                                      # reference attack; the loss attack: score = -loss\n"
         "mine = privacy.audit(score, images[\"member\"], groups=images[\"patient\"], n_boot=n_boot, seed=audit_seed(rep, \"pooled\"))\n"
         "print(f\"{images['member'].sum()} members, {(~images['member']).sum()} non-members: AUC {mine.auc:.3f} \"\n"
         "      f\"[{mine.auc_low:.3f}, {mine.auc_high:.3f}], TPR at 1% FPR {mine.tpr[0.01][0]:.1%}\")"),
    md("## Every released model\nThe same two attacks on every model of every replicate, each in its scope: the "
       "pooled training images against all test images, and each hospital's own; a hospital's own model on its "
       "own patients only. The bootstrap draws are the same for every model of a scope."),
    code("audit = step_privacy_audit(R, n_boot=n_boot)"),
    md("The lines above give the step's numbers, and the **sanity check**: the reference attack on the pretrained "
       "model is the model against itself (every score 0), AUC 0.5 exactly."),
    code("# NBVAL_CHECK_OUTPUT\n"
         "row = audit.query(\"split_seed == @s and train_seed == @t and model == 'merged_data_vector' and attack == 'reference' \"\n"
         "                  \"and scope == 'pooled'\").iloc[0]\n"
         "print(\"the lines above give the step's row:\", abs(row.auc - mine.auc) < 1e-12 and abs(row.auc_high - mine.auc_high) < 1e-12)\n"
         "pretrained = audit[audit.model == \"pretrained\"]\n"
         "print(\"reference attack on the pretrained model, AUC exactly 0.5 in every scope:\",\n"
         "      bool((pretrained.query(\"attack == 'reference'\")[[\"auc\", \"auc_low\", \"auc_high\"]] == 0.5).all(axis=None)))"),
    md("The loss attack on the pretrained model must be about 0.5 too: an interval that excludes 0.5 there is a "
       "false alarm of the attack itself (expected in about 1 audit in 20)."),
    code("display(privacy_detail_table(R.dir, \"loss\", models=[\"pretrained\"]))"),
    md("AUC (0.5 = chance) and TPR at low FPR (%), each model in its own scope:"),
    code("for attack in [\"reference\", \"loss\"]:\n"
         "    table = privacy_table(R.dir, attack)\n"
         "    reporting.save_table(table, R.result(f\"privacy_table_{attack}\"))\n"
         "    display(Markdown(privacy_caption(R.dir, attack)))\n"
         "    display(table)"),
    md("Each replicate on its own, with its patient-bootstrap intervals (reference attack):"),
    code("display(privacy_detail_table(R.dir, \"reference\"))"),
    md("On each hospital's patients: the hospital's own model beside the models released to everyone, same "
       "members, same non-members, same bootstrap draws (reference attack)."),
    code("display(per_hospital_table(R.dir, \"reference\"))"),
    code("plot_roc(R.dir, out=FIG / \"privacy_roc\");"),
    md("## Differentially private fine-tuning\nEach hospital fine-tunes with **DP-SGD** instead (`dvlib.studies.privacy.dp.fit_dp`, "
       "Opacus' accountant): every step samples each image with probability q = batch/n, clips each image's "
       "gradient to norm 1, adds Gaussian noise and hands the result to Adam; the noise is the smallest that keeps "
       "(epsilon, delta = 1/n). BatchNorm mixes the images of a batch, so it has no per-image gradient: the "
       "pretrained BatchNorm layers are **frozen** (statistics and affine parameters). Then the same merge "
       "($\\theta_{pre} + 0.5 \\sum_i \\tau_i$) and restores. **What the guarantee covers**: the merge only "
       "post-processes vectors of disjoint patients, so the merged model before any restore is (epsilon, delta)-DP "
       "for every training image; *BN recalibration* and the *restore epoch* use the hospitals' images outside "
       "DP-SGD and are not covered (shown for their accuracy, marked). It is per image: a patient with k images "
       "is protected at k × epsilon. The label counts and local test metrics in a vector file are not covered "
       "either.\n\n"
       "**Cost** (2 CPU cores, quick preset): DP-SGD through every layer (`all_but_bn`) costs about twice a "
       "non-private fine-tuning, and 3 epsilons × 4 hospitals per replicate is 12 fine-tunings, hours for 3 "
       "replicates; `last_stages` (the last two blocks, the pretrained classifier and the head) runs at about the "
       "non-private speed, since the backward pass stops at block 5, and is the default here. See the README for "
       "the measured times."),
    code("dp = step_dp(R, epsilons, trainable=dp_trainable, delta=delta, n_boot=n_boot,\n"
         "             train_seeds=dp_train_seeds or R.train_seeds[:1])\n"
         "files = dp_file_summary(R)\n"
         "print(files.drop(columns=[\"folder\"]).to_string(index=False, float_format=\"%.4g\"))"),
    code("# NBVAL_CHECK_OUTPUT\n"
         "print(\"every DP vector file records the epsilon the accountant computes, at most its target:\",\n"
         "      bool(np.allclose(files.epsilon, files.accountant_epsilon, rtol=1e-9) and (files.epsilon <= files.target_epsilon).all()))"),
    code("table = dp_table(R.dir, \"accuracy\")\n"
         "reporting.save_table(table.reset_index(level=\"model\"), R.result(\"dp_table\"))\n"
         "display(Markdown(dp_caption(R.dir)))\n"
         "display(table)"),
    code("plot_privacy_utility(R.dir, \"accuracy\", out=FIG / \"privacy_utility\");"),
    md("## What a hospital should conclude\nWritten from the numbers above."),
    code("display(Markdown(privacy_summary(R.dir)))"),
]
