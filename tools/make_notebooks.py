"""Write notebooks/01..06 from the cell sources below (the notebooks' single source of truth).

Run ``make notebooks`` after editing; it rewrites the notebooks without outputs and executes them
with the smoke defaults so the committed copies carry the outputs nbval compares.
"""
from __future__ import annotations

import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]

IMPORTS = """\
import pandas as pd
from IPython.display import Image, Markdown, display

from dvlib import experiment as ex
from dvlib import reporting

pd.set_option("display.precision", 4)
pd.set_option("display.width", 160)"""

PARAMS = """\
run: str = "smoke"     # run name: outputs go to runs/<run>/, reports/<run>/, figures/<run>/
preset: str = "smoke"  # settings preset: smoke (synthetic, seconds) | quick (2 CPU cores) | paper (GPU)
dataset: str = ""      # dataset name or image folder; empty means the preset's dataset
seeds: list = [0]      # one whole protocol (split, training, merging) per seed
device: str = "auto"   # auto | cpu | cuda
runs_dir: str = ""     # folder holding run folders; empty means runs/ at the project root
figures_dir: str = ""  # where figures go; empty means figures/<run>/ at the project root"""

SETUP = """\
R = ex.setup_run(run, preset, dataset, seeds, device, runs_dir)
FIG = ex.figures_dir(R, figures_dir)
P = R.preset
print(f"run {R.name!r} | preset {preset} | dataset {P.dataset} | seeds {R.seeds} | {P.arch} ({P.weights}) "
      f"@ {P.image_size}px | {P.epochs} epochs, batch {P.batch_size}, lr {P.lr:g} | lambda {P.lam}")"""


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str, tags: tuple[str, ...] = ()):
    c = new_code_cell(text.strip())
    if tags:
        c.metadata["tags"] = list(tags)
    return c


def header(title: str, purpose: str, inputs: str, outputs: str, extra_params: str = "") -> list:
    return [
        md(f"# {title}\n\n{purpose}\n\n**Inputs:** {inputs}\n\n**Outputs:** {outputs}"),
        code(IMPORTS),
        code(PARAMS + ("\n" + extra_params if extra_params else ""), tags=("parameters",)),
        code(SETUP),
    ]


NOTEBOOKS = {
    "01_split_data": header(
        "01 · Split the data into hospitals",
        "Simulates N hospitals by splitting the dataset **by patient** (a patient's images never cross "
        "hospitals or train/test), label-stratified and near-equal. Each hospital gets its own train/test "
        "split, because the paper evaluates every \"Part Index\" on that hospital's own data. The split is "
        "written once per seed as a manifest and reused by every later notebook.",
        "the dataset under `$DVLIB_DATA` (or the synthetic set for the smoke preset).",
        "`runs/<run>/seed_<s>/manifest.csv`, `runs/<run>/results/shards.csv`, `figures/<run>/shards.png`.",
    ) + [
        md("## The dataset\nWhat is on disk, per class. For PAD-UFES-20 here this is a partial copy "
           "(see `$DVLIB_DATA/README.md`): numbers are not comparable one to one with published results."),
        code("index = ex.dataset_index(R)\ndisplay(pd.DataFrame([index.summary()]))\ndisplay(index.counts())"),
        md("## Hospitals\nImages per class in each hospital's train and test split (first seed)."),
        code("shards = ex.step_split(R)\ndisplay(shards[shards.seed == R.seeds[0]].set_index([\"hospital\", \"subset\"]))"),
        md("Invariants of the saved split (compared by nbval in CI):"),
        code("# NBVAL_CHECK_OUTPUT\nfor seed, checks in ex.split_checks(R).items():\n    print(f\"seed {seed}: {checks}\")\n"
             "print(shards.groupby([\"seed\", \"subset\"])[\"patients\"].apply(list).to_string())"),
        code("reporting.plot_shards(R.dir, FIG / \"shards\");"),
    ],
    "02_finetune_hospitals": header(
        "02 · Fine-tune each hospital's model, and Full Training",
        "Every hospital fine-tunes the same ImageNet-pretrained network on its own training images "
        "(Adam, weighted cross-entropy, augmentation); **Full Training** fine-tunes on all hospitals' "
        "training images together (the reference the paper compares against). Each model is evaluated on "
        "every hospital's test split and on all test images. Checkpoints that exist are reused; the "
        "`hospitals` parameter trains a subset, so hospitals can be spread over machines; on one machine "
        "with several GPUs the models train in parallel, one process per GPU (`devices`).",
        "the manifests of notebook 01.",
        "`runs/<run>/seed_<s>/checkpoints/{pretrained,hospital_<i>,full}.safetensors` (+ JSON sidecars), "
        "`results/finetune_eval.csv`, `results/finetune_history.csv`, `figures/<run>/training.png`.",
        extra_params='hospitals: list = []  # targets to train, e.g. 0 1 full; empty means every hospital and Full Training\n'
                     'devices: list = []    # one training process per device, e.g. ["cuda:0", "cuda:1"]; empty means '
                     'every visible GPU when device is auto and there are several',
    ) + [
        code("targets = [t if str(t) == \"full\" else f\"hospital_{int(t)}\" for t in hospitals] or None\n"
             "finetune = ex.step_finetune(R, targets, progress=False, devices=devices or None)"),
        md("Accuracy (mean over seeds) of each model on each hospital's test split (`h0`…) and on all "
           "test images (`pooled`). A hospital's own model on its own test split is the paper's **Base Model**."),
        code("display(finetune.pivot_table(index=\"model\", columns=\"eval_on\", values=\"accuracy\"))\n"
             "display(finetune.pivot_table(index=\"model\", columns=\"eval_on\", values=\"balanced_accuracy\"))"),
        code("reporting.plot_training(R.dir, FIG / \"training\");"),
    ],
    "03_merge": header(
        "03 · Merge the hospitals' models",
        "The coordinator receives each hospital's **data vector** `tau_i = theta_i - theta_pre` and forms "
        "`theta_pre + lambda * sum(tau_i)` (lambda 0.5; the new heads are averaged). Baselines: **Params "
        "Mean** (uniform average of the N models), **Random Vector** (each tau_i replaced by a Gaussian "
        "of the same per-layer norm), and, beyond the paper, TIES, DARE and a sample-count-weighted mean. "
        "BatchNorm running statistics are averaged here; notebook 04 restores them. Lambda is fixed at "
        "the paper's 0.5 beforehand; the sweep below is descriptive and is not used to choose it.",
        "checkpoints of notebook 02.",
        "`checkpoints/merged_<method>.safetensors`, `results/merge_eval.csv`, `results/lambda_eval.csv`, "
        "`results/bn_policy_eval.csv`, `figures/<run>/lambda_curve.png`.",
        extra_params='methods: list = ["params_mean", "data_vector", "random_vector", "ties", "dare", "weighted"]  # merge methods\n'
                     'lambdas: list = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # lambda sweep of the data-vector merge',
    ) + [
        code("merged = ex.step_merge(R, methods, lambdas)\n"
             "display(merged[merged.eval_on == \"pooled\"].groupby(\"method\")[[\"accuracy\", \"balanced_accuracy\", \"macro_f1\", \"auc_ovr\"]].mean())"),
        md("The saved merges equal their formulas, recomputed here with plain tensor arithmetic:"),
        code("# NBVAL_CHECK_OUTPUT\nfor seed in R.seeds:\n"
             "    print(f\"seed {seed}: data_vector merge equals theta_pre + lam*sum(tau_i): {ex.verify_merge(R, seed, 'data_vector') < 1e-6}\")\n"
             "    print(f\"seed {seed}: params_mean merge equals the mean of the models: {ex.verify_merge(R, seed, 'params_mean') < 1e-6}\")"),
        md("## Lambda\nPooled test accuracy of the data-vector merge against lambda, before any restore. "
           "`lambda = 1/N` is the plain average of the fine-tuned weights."),
        code("reporting.plot_lambda_curve(R.dir, \"accuracy\", FIG / \"lambda_curve\");"),
        md("## What to do with BatchNorm buffers\nThe same data-vector merge with three policies for the "
           "running statistics: averaged (`mean`), the pretrained ones (`pretrained`), or the weights' "
           "formula applied to them too (`arithmetic`), which can drive running variances negative."),
        code("bn = reporting.load_results(R.dir, \"bn_policy_eval\")\n"
             "display(bn[bn.eval_on == \"pooled\"].groupby(\"bn_buffers\")[[\"accuracy\", \"balanced_accuracy\", \"negative_var_layers\"]].mean())"),
    ],
    "04_restore_bn": header(
        "04 · Restore the model state (BatchNorm)",
        "Merged weights no longer match their BatchNorm running statistics. Restore modes: **none**; "
        "**BN recalibrate** (label-free: reset the statistics and run forward passes over each "
        "hospital's training images in turn; hospitals share statistics only, no labels, no gradients); "
        "**1 epoch per hospital** (the paper's section 4.1: train the merged model for one epoch at each "
        "hospital in turn). The same restores applied to the plain pretrained model (`Pretrained (no "
        "merge)`) show how much of the gain the restore epoch gives on its own.",
        "checkpoints of notebooks 02 and 03.",
        "`results/restore_eval.csv`, `results/restore_log.csv`, `checkpoints/restored_*.safetensors`.",
        extra_params='restore_modes: list = ["none", "recalibrate", "finetune_epoch"]  # restore modes to compare\n'
                     'finetune_methods: list = []  # methods that get the training-based restore; empty means all',
    ) + [
        code("restored = ex.step_restore(R, modes=restore_modes, finetune_methods=finetune_methods or None)"),
        md("Pooled test accuracy and balanced accuracy (mean ± std over seeds, %): merge method × restore mode."),
        code("display(reporting.ablation_table(R.dir, \"accuracy\"))\ndisplay(reporting.ablation_table(R.dir, \"balanced_accuracy\"))"),
        md("Our recalibration equals `torch.optim.swa_utils.update_bn` fed the same batches:"),
        code("# NBVAL_CHECK_OUTPUT\nfor seed in R.seeds:\n"
             "    print(f\"seed {seed}: BN recalibration equals update_bn: {ex.verify_recalibration(R, seed) < 1e-5}\")"),
    ],
    "05_layerwise_similarity": header(
        "05 · Layer-wise cosine similarity (the paper's Figure 2)",
        "For every convolution layer, in network order, the cosine similarity between a model's "
        "movement from the pretrained weights and Full Training's movement. Blue: each hospital's data "
        "vector. Red: the merged data vector (cosine is scale-free, so lambda does not matter), before "
        "and after restore. The paper's claim: the merged vector points closer to Full Training than any "
        "hospital's. (Params Mean moves the pretrained weights by the *mean* of the data vectors, which has "
        "the same direction as their sum, so its line coincides with the data vector's before restore.)",
        "checkpoints of notebooks 02-04.",
        "`results/layer_cosine.csv`, `figures/<run>/fig2_layerwise_cosine.{png,pdf}`.",
    ) + [
        code("cos = ex.step_similarity(R)\n"
             "display(cos.groupby(\"model\")[\"cosine\"].agg([\"mean\", \"median\", \"min\", \"max\"]).sort_values(\"mean\"))"),
        code("reporting.plot_layer_cosine(R.dir, FIG / \"fig2_layerwise_cosine\");"),
    ],
    "06_results": header(
        "06 · Results",
        "The paper's tables for this dataset (rows: Part Index i, evaluated on hospital i's own test "
        "split; columns: Params Mean, Data Vector, Random Vector, Base Model = hospital i's own model, "
        "Full Training), as mean ± std over seeds, for accuracy and balanced accuracy; the paper's "
        "numbers beside ours; where the data vector wins and where it loses; the restore ablation. "
        "Everything here is read from the run's CSV files.",
        "`runs/<run>/results/*.csv`.",
        "`results/table_*.{csv,md}`, `results/ablation_*.{csv,md}`, `results/paper_comparison.csv`.",
        extra_params='restore: str = "finetune_epoch"  # restore mode of the merged models in the paper-layout tables',
    ) + [
        md("## Tables 1–3 layout"),
        code("for metric in [\"accuracy\", \"balanced_accuracy\"]:\n"
             "    table = reporting.paper_table(R.dir, metric, restore)\n"
             "    reporting.save_table(table, R.result(f\"table_{metric}\"))\n"
             "    display(Markdown(f\"**{metric.replace('_', ' ')} (%)**, restore: {reporting.RESTORE_LABELS[restore]}\"))\n"
             "    display(table)"),
        md("Same layout with the label-free BN recalibration instead of the extra training epoch:"),
        code("display(reporting.paper_table(R.dir, \"accuracy\", \"recalibrate\"))"),
        md("## Where the data vector wins and where it loses\nPer seed and hospital, Data Vector against each "
           "column (accuracy; difference in percentage points)."),
        code("wins = reporting.wins_summary(R.dir, \"accuracy\", restore)\nreporting.save_table(wins, R.result(\"wins_accuracy\"))\ndisplay(wins)\n"
             "print(reporting.headline(R.dir, \"accuracy\", restore))\nprint()\nprint(reporting.headline(R.dir, \"balanced_accuracy\", restore))"),
        md("## The paper's numbers beside ours\nOnly where the dataset matches. The paper used ResNet50 at "
           "64 epochs on the full datasets; differences in data, network and budget are listed in the README."),
        code("if P.dataset in reporting.paper_datasets():\n"
             "    comparison = reporting.paper_comparison(R.dir, P.dataset, restore)\n"
             "    reporting.save_table(comparison, R.result(\"paper_comparison\"))\n"
             "    display(comparison)\n"
             "else:\n"
             "    print(f\"the paper has no table for {P.dataset!r}\")"),
        md("## Is the gain the merge or the restore epoch?\nPooled test set, mean ± std over seeds (%)."),
        code("for metric in [\"accuracy\", \"balanced_accuracy\"]:\n"
             "    ablation = reporting.ablation_table(R.dir, metric)\n"
             "    reporting.save_table(ablation, R.result(f\"ablation_{metric}\"))\n"
             "    display(Markdown(f\"**{metric.replace('_', ' ')}**\"))\n"
             "    display(ablation)"),
        md("## Figures"),
        code("for name in [\"fig2_layerwise_cosine\", \"lambda_curve\", \"training\"]:\n"
             "    if (FIG / f\"{name}.png\").exists():\n"
             "        display(Markdown(f\"`{name}`\"), Image(filename=str(FIG / f\"{name}.png\")))"),
    ],
}


def main() -> int:
    out_dir = ROOT / "notebooks"
    out_dir.mkdir(exist_ok=True)
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=cells)
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what changed
            cell.id = f"{name[:2]}-{i:02d}"
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.write(nb, str(out_dir / f"{name}.ipynb"))
        print(f"wrote notebooks/{name}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
