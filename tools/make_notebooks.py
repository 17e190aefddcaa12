"""Write notebooks/01..08 from the cell sources below (07 and 08 from tools/nb_07_federated.py and
tools/nb_08_privacy.py) (the notebooks' single source of truth).

``make notebooks`` runs this, then executes the notebooks with the smoke defaults so the committed
copies carry the outputs nbval compares. It refuses to overwrite a notebook whose code or markdown
differs from what this file last wrote (a student's edits), unless given ``--force``; the last
written sources are kept in ``notebooks/.generated.json``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dvlib import methods, restore  # noqa: E402  (the registries: parameter comments come from them)

IMPORTS = """\
%matplotlib inline
import pandas as pd
import torch
from IPython.display import Markdown, display

from dvlib import experiment as ex
from dvlib import reporting

pd.set_option("display.precision", 1)
pd.set_option("display.width", 160)"""

PARAMS = """\
run: str = "smoke"     # run name: outputs go to runs/<run>/, reports/<run>/, figures/<run>/
preset: str = "smoke"  # settings preset: smoke (synthetic, seconds) | quick (2 CPU cores) | paper (GPU)
dataset: str = ""      # dataset name or image folder; empty means the preset's dataset
seeds: list = [0]      # split seeds: which patients go to which hospital (one split each)
train_seeds: list = [] # training seeds per split (heads, shuffling, augmentation); empty means the preset's
device: str = "auto"   # auto | cpu | cuda
runs_dir: str = ""     # folder holding run folders; empty means runs/ at the project root
figures_dir: str = ""  # where figures go; empty means figures/<run>/ at the project root"""

SETUP = """\
R = ex.open_run(run, preset, seeds=seeds, train_seeds=train_seeds, root=runs_dir, device=device, dataset=dataset)
FIG = ex.figures_dir(R, figures_dir)
P = R.preset
print(f"run {R.name!r} | preset {preset} | dataset {P.dataset} | split seeds {R.split_seeds} | training seeds "
      f"{R.train_seeds} | {P.arch} ({P.weights}) @ {P.image_size}px | {P.epochs} epochs, batch {P.batch_size}, "
      f"lr {P.lr:g} | lambda {P.lam}")"""

METHOD_NAMES = " | ".join(methods.METHODS)
MODE_NAMES = " | ".join(restore.MODES)


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
        "hospitals or train/test), label-stratified and near-equal (`iid`) or label-skewed (`dirichlet`). "
        "Hospitals are numbered 1..N, the paper's *Part Index*. Each hospital gets its own train/test "
        "split, because the paper evaluates every Part Index on that hospital's own data. The split is "
        "written once per split seed as a manifest and reused by every later notebook.",
        "the dataset under `$DVLIB_DATA` (or the synthetic set for the smoke preset).",
        "`runs/<run>/split_<s>/manifest.csv`, `results/shards.csv`, `figures/<run>/shards.png`.",
    ) + [
        md("## The dataset\nWhat is on disk, per class. For PAD-UFES-20 here this is a partial copy "
           "(see `data/README.md`): numbers are not comparable one to one with published results."),
        code("index = ex.dataset_index(R)\ndisplay(pd.DataFrame([index.summary()]))\ndisplay(index.counts())"),
        md("## Hospitals\nImages per class in each hospital's train and test split (first split seed)."),
        code("shards = ex.step_split(R)\ndisplay(reporting.shard_table(R.dir))"),
        md("Invariants of the saved split (compared by nbval in CI):"),
        code("# NBVAL_CHECK_OUTPUT\nfor seed, checks in ex.split_checks(R).items():\n    print(f\"split seed {seed}: {checks}\")\n"
             "print(shards.groupby([\"split_seed\", \"subset\"])[\"patients\"].apply(list).to_string())"),
        code("reporting.plot_shards(R.dir, FIG / \"shards\");"),
    ],
    "02_finetune_hospitals": header(
        "02 · Fine-tune each hospital's model, and Full Training",
        "Every hospital runs `dvlib site finetune` on its own training images: the same ImageNet-pretrained "
        "network (a new head seeded alike everywhere), Adam, cross-entropy weighted by its class "
        "frequencies, augmentation. It keeps only its **data vector** file: $\\tau_i = \\theta_i - "
        "\\theta_{pre}$, its head and its BatchNorm statistics. **Full Training** fine-tunes on all "
        "hospitals' training images together, the reference the paper compares against. Files that exist "
        "are reused; `hospitals` trains a subset, so hospitals can be spread over machines; with several "
        "GPUs the models train in parallel, one process per GPU (`devices`).",
        "the manifests of notebook 01.",
        "`runs/<run>/split_<s>/train_<t>/models/{hospital_<i>,full}.dv.safetensors`, "
        "`results/finetune_eval.csv`, `results/finetune_history.csv`, `figures/<run>/training.png`.",
        extra_params='hospitals: list = []  # targets to train, e.g. [1, 2, "full"]; empty means every hospital and Full Training\n'
                     'devices: list = []    # one training process per device, e.g. ["cuda:0", "cuda:1"]; empty means '
                     'every visible GPU when device is auto and there are several',
    ) + [
        code("targets = [t if str(t) == \"full\" else f\"hospital_{int(t)}\" for t in hospitals] or None\n"
             "finetune = ex.step_finetune(R, targets, progress=True, devices=devices or None)"),
        md("Accuracy (%, mean over replicates) of each model on each hospital's test split and on all test "
           "images. A hospital's own model on its own test split is the paper's **Base Model**."),
        code("display(reporting.finetune_table(R.dir, \"accuracy\"))"),
        code("reporting.plot_training(R.dir, FIG / \"training\");"),
    ],
    "03_merge": header(
        "03 · Merge the hospitals' models",
        "The coordinator receives each hospital's data vector $\\tau_i = \\theta_i - \\theta_{pre}$ and runs "
        "`dvlib merge`: $\\theta_{mix} = \\theta_{pre} + \\lambda \\sum_i \\tau_i$ with $\\lambda = 0.5$, the "
        "new heads averaged. Baselines: **Params Mean** ($\\frac{1}{N}\\sum_i \\theta_i$), **Random Vector** "
        "(each $\\tau_i$ replaced by Gaussian noise of the same per-layer norm) and, beyond the paper, TIES, "
        "DARE and a sample-count-weighted mean. BatchNorm statistics are averaged here; notebook 04 "
        "restores them. Lambda is fixed at the paper's 0.5 beforehand; the sweep below is descriptive and "
        "is not used to choose it.",
        "the vector files of notebook 02.",
        "`models/merged_<method>.safetensors`, `results/merge_eval.csv`, `results/lambda_eval.csv`, "
        "`results/bn_policy_eval.csv`, `figures/<run>/lambda_curve.png`.",
        extra_params=f'methods: list = {list(methods.METHODS)}  # merge methods: {METHOD_NAMES}\n'
                     'lambdas: list = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # lambda sweep of the data-vector merge',
    ) + [
        md("## The method, in three lines\nFor the first replicate: the pretrained weights, each hospital's "
           "fine-tuned weights, their data vectors, and the merge. `DataVector` makes the formula plain "
           "code: `+` adds movements, `lam * v` scales them, and the heads and BatchNorm statistics, which "
           "have no pretrained value to move from, are averaged over the hospitals summed."),
        code("from dvlib.vectors import DataVector\n\n"
             "s, t = R.replicates[0]\n"
             "theta_pre, theta = ex.theta(R, s, t)                                  # pretrained; each hospital's fine-tuned weights\n"
             "taus = [DataVector.between(theta_i, theta_pre) for theta_i in theta]  # tau_i = theta_i - theta_pre\n"
             "theta_mix = (P.lam * sum(taus)).apply_to(theta_pre)                   # theta_pre + lambda * sum_i tau_i\n"
             "taus[0]"),
        md("The coordinator's merge (`dvlib merge`, run for every method below) gives the same weights:"),
        code("merged = ex.step_merge(R, methods)\n"
             "library = ex.load_model(R.model_path(s, t, \"merged_data_vector\")).state\n"
             "gap = max(float((theta_mix[k] - library[k]).abs().max()) for k in library)"),
        code("# NBVAL_CHECK_OUTPUT\nprint(f\"theta_mix equals dvlib merge's model: {gap < 1e-5}\")\n"
             "for s_, t_ in R.replicates:\n"
             "    print(f\"split {s_} train {t_}: data_vector merge equals theta_pre + lam*sum(theta_i - theta_pre): \"\n"
             "          f\"{ex.verify_merge(R, s_, t_, 'data_vector') < 1e-5}; params_mean equals the mean of the models: \"\n"
             "          f\"{ex.verify_merge(R, s_, t_, 'params_mean') < 1e-5}\")"),
        md("Pooled test metrics of every merge before any restore (%, mean over replicates):"),
        code("display(reporting.method_table(R.dir, \"merge_eval\"))"),
        md("## Lambda\nPooled test accuracy of the data-vector merge against $\\lambda$, before any restore. "
           "$\\lambda = 1/N$ is the plain average of the fine-tuned weights."),
        code("lam = ex.step_lambda(R, lambdas)\nreporting.plot_lambda_curve(R.dir, \"accuracy\", FIG / \"lambda_curve\");"),
        md("## What to do with BatchNorm statistics\nThe same data-vector merge with three policies for the "
           "running statistics: averaged (`mean`), the pretrained ones (`pretrained`), or the weights' "
           "formula applied to them too (`arithmetic`), which can drive running variances negative."),
        code("bn = ex.step_bn_policy(R)\ndisplay(reporting.bn_policy_table(R.dir))"),
    ],
    "04_restore_bn": header(
        "04 · Restore the model state (BatchNorm)",
        "Merged weights no longer match their BatchNorm running statistics. The merged model visits the "
        "hospitals in turn, each running `dvlib site restore`. Restore modes: **none**; **BN recalibrate** "
        "(label-free: the first visit resets the statistics, each visit adds its training images to a "
        "cumulative average; no labels, no gradients); **1 epoch per hospital** (the paper's section 4.1). "
        "The same restores applied to the bare pretrained model (`Pretrained (no merge)`) show how much of "
        "the gain the restore epoch gives on its own.",
        "the merged models of notebook 03.",
        "`results/restore_eval.csv`, `results/restore_log.csv`, `models/restored_*.safetensors`.",
        extra_params=f'restore_modes: list = {list(restore.MODES)[:3]}  # restore modes to compare: {MODE_NAMES}\n'
                     'finetune_methods: list = []  # methods that get the training-based restore; empty means all',
    ) + [
        md("## BatchNorm recalibration, in a few lines\nFor each BatchNorm layer, the running mean and "
           "variance become the average of the batch statistics over every hospital's training images: "
           "reset them, switch to a cumulative average (`momentum=None`), and run forward passes without "
           "gradients."),
        code("from dvlib.bn import bn_modules\nfrom dvlib.loader import batches\n\n"
             "s, t = R.replicates[0]\nrep = ex.replicate(R, s, t)\n"
             "model = rep.model_from(ex.load_model(R.model_path(s, t, \"merged_data_vector\")).state)\n"
             "for bn in bn_modules(model):\n"
             "    bn.reset_running_stats()\n"
             "    bn.momentum = None                               # cumulative average over all batches\n"
             "model.train()\n"
             "with torch.no_grad():\n"
             "    for shard in rep.train_shards():                 # hospital 1, then 2, ...: images only\n"
             "        for x, _ in batches(shard.cache, shard.rows, None, 64, P.image_size, train=False):\n"
             "            model(x)\n"
             "ours = {k: v.clone() for k, v in model.state_dict().items()}"),
        code("restored = ex.step_restore(R, modes=restore_modes, finetune_methods=finetune_methods or None, progress=True)"),
        md("The same statistics come out of the hospitals' `dvlib site restore` visits, and out of "
           "`torch.optim.swa_utils.update_bn` fed the same batches:"),
        code("# NBVAL_CHECK_OUTPUT\nlibrary = ex.load_model(R.model_path(s, t, \"restored_data_vector_recalibrate\")).state\n"
             "print(\"the lines above equal the hospitals' visits:\", max(float((ours[k] - library[k]).abs().max()) for k in library if \"running\" in k) < 1e-5)\n"
             "for s_, t_ in R.replicates:\n"
             "    print(f\"split {s_} train {t_}: BN recalibration equals update_bn: {ex.verify_recalibration(R, s_, t_) < 1e-5}\")"),
        md("Pooled test metrics (%, mean over replicates): merge method × restore mode."),
        code("display(reporting.ablation_table(R.dir, \"accuracy\"))\ndisplay(reporting.ablation_table(R.dir, \"balanced_accuracy\"))"),
    ],
    "05_layerwise_similarity": header(
        "05 · Layer-wise cosine similarity (the paper's Figure 2)",
        "For every convolution layer, in network order, the cosine similarity between a model's movement "
        "from the pretrained weights and Full Training's: $\\cos(\\theta - \\theta_{pre},\\ \\theta_{full} - "
        "\\theta_{pre})$. Blue: each hospital's data vector. Red: the merged data vector (cosine is "
        "scale-free, so $\\lambda$ does not matter), before and after restore. The paper's claim: the merged "
        "vector points closer to Full Training than any hospital's. (Params Mean moves the pretrained "
        "weights by the *mean* of the data vectors, which has the direction of their sum, so its line "
        "coincides with the data vector's before restore.)",
        "the model files of notebooks 02-04.",
        "`results/layer_cosine.csv`, `figures/<run>/fig2_layerwise_cosine.{png,pdf}`.",
    ) + [
        code("cos = ex.step_similarity(R)\nreporting.plot_layer_cosine(R.dir, FIG / \"fig2_layerwise_cosine\");"),
        md("Per model, over layers and replicates: the mean cosine, and in how many layers the merged "
           "vector is closer to Full Training's than every hospital's."),
        code("display(reporting.figure2_summary(R.dir))"),
    ],
    "06_results": header(
        "06 · Results",
        "The paper's tables for this dataset (rows: Part Index i, evaluated on hospital i's own test "
        "split; columns: Params Mean, Data Vector, Random Vector, Base Model = hospital i's own model, "
        "Full Training), as the mean with a 95 % interval over replicates (split seed × training seed), "
        "for accuracy and balanced accuracy; every claim with a paired test; the paper's numbers beside "
        "ours; the restore ablation. Everything here is read from the run's result files.",
        "`runs/<run>/results/*.csv`.",
        "`results/table_*.{csv,md}`, `results/claims_*.{csv,md}`, `results/ablation_*.{csv,md}`, "
        "`results/paper_comparison.csv`.",
        extra_params=f'restore: str = "finetune_epoch"  # restore mode of the merged models in the paper-layout tables: {MODE_NAMES}',
    ) + [
        md("## Tables 1–3 layout"),
        code("for metric in [\"accuracy\", \"balanced_accuracy\"]:\n"
             "    table = reporting.paper_table(R.dir, metric, restore)\n"
             "    reporting.save_table(table, R.result(f\"table_{metric}\"))\n"
             "    display(Markdown(reporting.caption(R.dir, metric, restore)))\n"
             "    display(table)"),
        md("Same layout with the label-free BN recalibration instead of the extra training epoch:"),
        code("display(reporting.paper_table(R.dir, \"accuracy\", \"recalibrate\"))"),
        md("## Claims and their tests\nEvery comparison is paired: the same split, training seed and test "
           "images. *cells*: seed × hospital cells won/tied/lost, with a sign test; *pooled*: the difference on "
           "all test images, mean over replicates with a 95 % t-interval and a patient-level paired "
           "bootstrap of the first replicate; p-values Holm-adjusted over the family of claims."),
        code("for metric in [\"accuracy\", \"balanced_accuracy\"]:\n"
             "    claims = reporting.claims_table(R.dir, metric, restore)\n"
             "    reporting.save_table(claims, R.result(f\"claims_{metric}\"))\n"
             "    display(Markdown(f\"**{reporting.METRIC_LABELS[metric]}**\"))\n"
             "    display(claims)"),
        code("print(reporting.headline(R.dir, \"accuracy\", restore))"),
        md("## How much of the spread is the split, how much is training?\nWith several training seeds per "
           "split, the replicates' spread splits into a part due to which patients went where (split seed) "
           "and a part due to training randomness (training seed): one-way random-effects ANOVA, pooled test "
           "set, standard deviations in percentage points."),
        code("variance = reporting.variance_table({R.name: R.dir})\n"
             "display(variance if len(variance) else Markdown(\"*Needs at least 2 split seeds and 2 training seeds per split.*\"))"),
        md("## The paper's numbers beside ours\nOnly where the dataset matches. The paper used ResNet50 at "
           "64 epochs on the full datasets; differences in data, network and budget are listed in the README."),
        code("if P.dataset in reporting.paper_datasets():\n"
             "    comparison = reporting.paper_comparison(R.dir, P.dataset, restore)\n"
             "    reporting.save_table(comparison, R.result(\"paper_comparison\"))\n"
             "    display(comparison)\n"
             "else:\n"
             "    print(f\"the paper has no table for {P.dataset!r}\")"),
        md("## Is the gain the merge or the restore epoch?\nPooled test set (%, mean over replicates)."),
        code("for metric in [\"accuracy\", \"balanced_accuracy\"]:\n"
             "    ablation = reporting.ablation_table(R.dir, metric)\n"
             "    reporting.save_table(ablation, R.result(f\"ablation_{metric}\"))\n"
             "    display(Markdown(f\"**{reporting.METRIC_LABELS[metric]}**, pooled test set\"))\n"
             "    display(ablation)"),
        md("## Figures\nDrawn again from the result files alone."),
        code("reporting.plot_layer_cosine(R.dir);\nreporting.plot_lambda_curve(R.dir, \"accuracy\");"),
        md("## Provenance\nWhat produced these numbers: library versions, the commit, the device, and "
           "fingerprints of the dataset and the split manifests."),
        code("print(reporting.provenance_text(R.dir))"),
    ],
}

# 07 (Flower) and 08 (privacy audit) live in their own files; they import this module's helpers, so this
# script is made importable under its own name first (else the import would run it a second time)
sys.modules.setdefault("make_notebooks", sys.modules[__name__])
sys.path.insert(0, str(Path(__file__).resolve().parent))
from nb_07_federated import build as _build_07  # noqa: E402
from nb_08_privacy import CELLS as _CELLS_08  # noqa: E402

NOTEBOOKS["07_federated"] = _build_07(md, code, header)
NOTEBOOKS["08_privacy"] = _CELLS_08


def trim_imports(cells: list) -> list:
    """Drop from the imports cell what the notebook does not use (torch, Markdown), so that a linter
    over the notebooks (ruff, in make test) finds nothing to say."""
    body = "\n".join(c.source for c in cells if c.cell_type == "code" and c.source != IMPORTS)
    text = IMPORTS
    if "torch." not in body:
        text = text.replace("import torch\n", "")
    if "Markdown(" not in body:
        text = text.replace("from IPython.display import Markdown, display", "from IPython.display import display")
    if "reporting." not in body:
        text = text.replace("from dvlib import reporting\n", "")
    return [code(text) if c.cell_type == "code" and c.source == IMPORTS else c for c in cells]


def sources(nb) -> list[list[str]]:
    return [[c.cell_type, c.source] for c in nb.cells]


def digest(cells) -> str:
    return hashlib.sha256(json.dumps(cells).encode()).hexdigest()


def main(argv: list[str]) -> int:
    force = "--force" in argv
    out_dir = ROOT / "notebooks"
    out_dir.mkdir(exist_ok=True)
    record_path = out_dir / ".generated.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    edited = []
    for name in NOTEBOOKS:
        path = out_dir / f"{name}.ipynb"
        if path.exists() and name in record and digest(sources(nbformat.read(str(path), as_version=4))) != record[name]:
            edited.append(path.name)
    if edited and not force:
        print(f"refusing to overwrite notebooks edited since they were generated: {', '.join(edited)}. Move your "
              "changes into tools/make_notebooks.py (or save them elsewhere), then run with --force.", file=sys.stderr)
        return 2
    for name, cells in NOTEBOOKS.items():
        nb = new_notebook(cells=trim_imports(cells))
        for i, cell in enumerate(nb.cells):  # stable ids: regenerating changes only what changed
            cell.id = f"{name[:2]}-{i:02d}"
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nb.metadata["language_info"] = {"name": "python"}
        nbformat.write(nb, str(out_dir / f"{name}.ipynb"))
        record[name] = digest(sources(nb))
        print(f"wrote notebooks/{name}.ipynb")
    record_path.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
