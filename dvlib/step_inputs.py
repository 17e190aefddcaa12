"""What each notebook of the chain needs from the ones before it, and the one line that says what to
run first when it is missing (a notebook opened in JupyterLab before its inputs exist)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

from dvlib.io import DvlibError
from dvlib.runs import project_root

CHAIN = ("01_split_data", "02_finetune_hospitals", "03_merge", "04_restore_bn", "05_layerwise_similarity",
         "06_results")
# a notebook's inputs: the files of the chain's step before it (07 and 08 start from 04's models)
BEFORE = {**{later: earlier for earlier, later in zip(CHAIN, CHAIN[1:])},
          "07_federated": "04_restore_bn", "08_privacy": "04_restore_bn"}


def _models(run, *tags: str) -> list[Path]:
    return [run.model_path(s, t, tag) for s, t in run.replicates for tag in tags]


# per step, the files of it that the notebooks after it read
OUTPUTS: dict[str, Callable[..., list[Path]]] = {
    "01_split_data": lambda run: [run.manifest_path(s) for s in run.split_seeds],
    "02_finetune_hospitals": lambda run: _models(run, *(f"hospital_{h}" for h in range(1, run.preset.n_hospitals + 1)),
                                                 "full"),
    "03_merge": lambda run: _models(run, "merged_data_vector"),
    "04_restore_bn": lambda run: [run.result("restore_eval")],
    "05_layerwise_similarity": lambda run: [run.result("layer_cosine")],
}


def missing_before(run, step: str) -> tuple[list[str], Path] | None:
    """The steps to run before ``step`` (the earliest one whose files are missing, up to the one just
    before), and the first missing file; None when nothing is missing."""
    if step not in BEFORE:
        if step in CHAIN or step in ("07_federated", "08_privacy"):
            return None
        raise DvlibError(f"unknown step {step!r}; valid: {', '.join((*CHAIN, '07_federated', '08_privacy'))}")
    last = BEFORE[step]
    for earlier in CHAIN[:CHAIN.index(last) + 1]:
        absent = [p for p in OUTPUTS[earlier](run) if not p.exists()]
        if absent:
            return list(CHAIN[CHAIN.index(earlier):CHAIN.index(last) + 1]), absent[0]
    return None


def require(run, step: str) -> None:
    """Refuse, in one line naming the notebook (and the command) to run first, to open ``step`` on a
    run that lacks the files of the steps before it."""
    found = missing_before(run, step)
    if found is None:
        return
    steps, absent = found
    notebooks = " to ".join(dict.fromkeys((f"{steps[0]}.ipynb", f"{steps[-1]}.ipynb")))
    flags = [f"--run {run.name}", f"--preset {run.settings['preset']}"]  # dvlib run's defaults are not the run's
    if run.root.resolve() != (project_root() / "runs").resolve():
        flags.append(f"--runs-dir {run.root}")
    if run.split_seeds != [0]:
        flags.append(f"--seeds {' '.join(map(str, run.split_seeds))}")
    if run.train_seeds != [run.preset.seed]:
        flags.append(f"--train-seeds {' '.join(map(str, run.train_seeds))}")
    command = f"dvlib run {' '.join(flags)} --steps {' '.join(steps)}"
    raise DvlibError(f"{step} needs {absent.relative_to(run.dir)} of run {run.name!r}: run {notebooks} first "
                     f"(or: {command})")

