"""Restore the model state after merging (paper section 3.5): restore modes, registered once.

Merged weights no longer match their BatchNorm running statistics. A restore visits the hospitals
one after another; each *visit* runs at one hospital, on its own images, and is the same function
whether the simulation or ``dvlib site restore`` calls it:

- ``recalibrate`` (label-free, beyond the paper): the first visit resets the running statistics,
  every visit adds its images to a cumulative average (``momentum=None``), so visiting A then B gives
  the statistics of A's and B's batches in one pass. No labels, no gradients leave a hospital.
- ``finetune_epoch`` (the paper's section 4.1): one epoch of training at each hospital in turn
  (fresh Adam, the hospital's own class weights).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from dvlib.io import DvlibError
from dvlib.seeds import derive

if TYPE_CHECKING:
    from torch import nn

    from dvlib.loader import Shard

BN_BATCH = 64  # recalibration batch: large enough for stable batch statistics, small for memory


@dataclass(frozen=True)
class RestoreMode:
    name: str
    label: str
    visits: tuple[str, ...]  # the rounds of visits, each over every hospital in turn
    uses_labels: bool
    description: str
    reference: str


MODES: dict[str, RestoreMode] = {m.name: m for m in (
    RestoreMode("none", "none", (), False, "the merged model as it is", "-"),
    RestoreMode("recalibrate", "BN recalibrate", ("recalibrate",), False,
                "BatchNorm statistics recomputed over every hospital's training images, visited in turn",
                "Ioffe & Szegedy 2015 (BatchNorm); as torch.optim.swa_utils.update_bn"),
    RestoreMode("finetune_epoch", "1 epoch per hospital", ("finetune_epoch",), True,
                "one training epoch at each hospital in turn (the paper's restore)",
                "Tian et al. 2024, arXiv:2408.13038, section 4.1"),
    RestoreMode("recalibrate+finetune_epoch", "recalibrate + epoch", ("recalibrate", "finetune_epoch"), True,
                "a recalibration round, then a training round", "both of the above"),
)}
VISITS = ("recalibrate", "finetune_epoch")  # what one visit at one hospital can do


def get(name: str) -> RestoreMode:
    if name not in MODES:
        raise DvlibError(f"unknown restore mode {name!r}; valid: {', '.join(MODES)}")
    return MODES[name]


def recalibrate_visit(model: "nn.Module", shard: "Shard", *, size: int, reset: bool, device,
                      batch_size: int = BN_BATCH) -> dict:
    """Add one hospital's training images (centre crops) to the BatchNorm statistics, in place."""
    from dvlib.bn import recalibrate_bn
    from dvlib.loader import batches
    from dvlib.device import prepare, resolve_device, use_channels_last

    device = resolve_device(device)
    prepare(model, device)
    xs = (x for x, _ in batches(shard.cache, shard.rows, None, batch_size, size, train=False, device=device,
                                channels_last=use_channels_last(device)))
    (n,) = recalibrate_bn(model, [xs], device=device, reset=reset)
    model.eval()
    return {"images": n, "batches": -(-n // batch_size), "batch_size": batch_size, "reset": bool(reset)}


def epoch_visit(model: "nn.Module", shard: "Shard", *, size: int, batch_size: int, lr: float, seed: int,
                num_classes: int, device, progress: bool = False, epochs: int = 1) -> dict:
    """``epochs`` epoch(s) of training at one hospital (its own class weights), in place."""
    from dvlib.train import class_weights, fit

    cw = class_weights(shard.labels.numpy(), num_classes, allow_missing=True)
    hist = fit(model, shard.cache, shard.rows, shard.labels, epochs=epochs, batch_size=batch_size, lr=lr, size=size,
               seed=seed, device=device, class_weight=cw, progress=progress, desc=f"restore@{shard.name}")
    return {"images": len(shard), "batch_size": batch_size, "lr": lr, "seed": seed,
            "loss": float(hist[-1]["loss"]) if hist else None}


def visit(model: "nn.Module", what: str, shard: "Shard", *, index: int, reset: bool, seed: int, size: int,
          batch_size: int, lr: float, num_classes: int, device, progress: bool = False, epochs: int = 1) -> dict:
    """One visit (``recalibrate`` or ``finetune_epoch``) at one hospital; ``index`` counts the visits
    the model has had before, and fixes the epoch's seed as ``derive(seed, index)``."""
    if what == "recalibrate":
        out = recalibrate_visit(model, shard, size=size, reset=reset, device=device)
    elif what == "finetune_epoch":
        out = epoch_visit(model, shard, size=size, batch_size=batch_size, lr=lr, seed=derive(seed, index),
                          num_classes=num_classes, device=device, progress=progress, epochs=epochs)
    else:
        raise DvlibError(f"unknown restore visit {what!r}; valid: {', '.join(VISITS)}")
    return {"site": shard.name, "mode": what, **out}


def restore(model: "nn.Module", mode: str, shards: "list[Shard]", **kw) -> list[dict]:
    """Every visit of ``mode`` (each round over every shard in turn), in place; the visits' records."""
    visits: list[dict] = []
    for what in get(mode).visits:
        for i, shard in enumerate(shards):
            visits.append(visit(model, what, shard, index=len(visits), reset=i == 0, **kw))
    model.eval()
    return visits


def table() -> str:
    """The registry as a Markdown table (docs/methods.md)."""
    rows = ["| restore mode | label | visits (each round: every hospital in turn) | labels used | what it does | reference |",
            "|---|---|---|---|---|---|"]
    for m in MODES.values():
        rows.append(f"| `{m.name}` | {m.label} | {', '.join(m.visits) or '–'} | {'yes' if m.uses_labels else 'no'} | "
                    f"{m.description} | {m.reference} |")
    return "\n".join(rows)
