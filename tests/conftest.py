"""Shared fixtures: small datasets written to temporary folders in the official layouts."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "datasets"

# property-based tests explore the same examples on every run: CI stays reproducible
from hypothesis import settings as _hyp_settings

_hyp_settings.register_profile("dvlib", derandomize=True, deadline=None)
_hyp_settings.load_profile("dvlib")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # 2-core machines: one intra-op thread keeps small tests fast and stable
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def write_image(path: Path, rng: np.random.Generator, size=(40, 30), fmt=None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path, format=fmt)


def write_site_folders(root: Path, names, n_patients: int, seed: int = 0) -> pd.DataFrame:
    """Synthetic images split into ``len(names)`` hospitals, each written as a site's image folder
    (``<root>/<name>/<class>/<image>.png`` + ``patients.csv``); returns the split's manifest."""
    from dvlib.data import load_dataset
    from dvlib.split import make_split

    index = load_dataset("synthetic", n_patients=n_patients, size=40)
    manifest = make_split(index, n_hospitals=len(names), seed=seed)
    for h, part in manifest.groupby("hospital"):
        site = root / names[h - 1]
        for _, r in part.iterrows():
            path = site / r["label"] / f"{r['image']}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(index.load_image(r["image"])).save(path)
        part[["image", "patient"]].to_csv(site / "patients.csv", index=False)
    return manifest


@pytest.fixture
def pad_root(tmp_path: Path) -> Path:
    """A tiny PAD-UFES-20 in the official layout: metadata.csv + images nested under images/,
    re-encoded as .jpg for some rows, one row without an image."""
    rng = np.random.default_rng(0)
    root = tmp_path / "data"
    folder = root / "pad_ufes_20"
    classes = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]
    rows = []
    for p in range(36):
        label = classes[p % 6]
        for k in range(1 + p % 2):
            img_id = f"PAT_{p}_{100 + p}_{k}.png"
            rows.append({"patient_id": f"PAT_{p}", "lesion_id": 100 + p, "diagnostic": label, "img_id": img_id,
                         "age": 50})
            part = f"imgs_part_{1 + p % 3}"
            ext = ".jpg" if k else ".png"
            write_image(folder / "images" / part / (Path(img_id).stem + ext), rng)
    rows.append({"patient_id": "PAT_999", "lesion_id": 1, "diagnostic": "BCC", "img_id": "PAT_999_1_0.png", "age": 1})
    pd.DataFrame(rows).to_csv(folder / "metadata.csv", index=False)
    return root


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "pad_ufes_20" / "metadata.csv").exists():
        pytest.skip("the shared PAD-UFES-20 subset is not beside this checkout")
    return SHARED_DATA


CHAIN_LAMBDAS = [0.0, 0.25, 0.5, 1.0]  # a notebook parameter (03) given to the chain instead of the default sweep
# 07 and 08 at their cheapest in the suite's chain (nbval runs them at their defaults): one Flower round,
# one privacy budget, few bootstrap resamples; the chain still runs and renders every notebook
CHAIN_PARAMS = {"lambdas": CHAIN_LAMBDAS, "fl_rounds": [1], "epsilons": [8.0], "n_boot": 100}


@pytest.fixture(scope="session")
def smoke_chain(tmp_path_factory):
    """The papermill chain (smoke preset, synthetic data, CPU) once per test session, with the notebooks
    that run only when asked (07, 08): (base folder, records)."""
    from dvlib.pipeline import STEPS, run_chain

    base = tmp_path_factory.mktemp("chain")
    dirs = {"runs_dir": str(base / "runs"), "reports_dir": str(base / "reports"), "figures_dir": str(base / "figures")}
    records = run_chain("t-smoke", "smoke", seeds=[0], device="cpu", log=lambda *_: None,
                        steps=[name for name, _ in STEPS], notebook_params=CHAIN_PARAMS, **dirs)
    return base, records


@pytest.fixture(scope="module")
def net():
    """A small BatchNorm CNN with a new 3-class head (random weights, seed 0)."""
    from dvlib.models import build

    return build("smallcnn", num_classes=3, weights="random", seed=0)


@pytest.fixture(scope="module")
def pair(net):
    """(pretrained, fine-tuned) state dicts: small seeded movements, counters advanced."""
    pre = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(5)
    ft = {k: (v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + 3)
          for k, v in pre.items()}
    return pre, ft
