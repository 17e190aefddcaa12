"""Fine-tuning and evaluation.

Adam, weighted cross-entropy (inverse class frequency of the hospital's training split), batched
GPU-friendly augmentation (:mod:`dvlib.loader`), bf16 autocast + channels_last on CUDA, fp32 on CPU,
seeded, no host synchronisation inside the step. Metrics come from scikit-learn.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from dvlib.io import DvlibError
from dvlib.loader import ImageCache, batches


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DvlibError(f"device {device!r} requested but CUDA is not available")
    return dev


def class_weights(labels, num_classes: int, allow_missing: bool = False) -> torch.Tensor:
    """w_c = n / (C * n_c) (inverse class frequency, mean 1 over a balanced set).

    A class with no samples gets an error, or weight 0 with ``allow_missing``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float64)
    if (counts == 0).any() and not allow_missing:
        raise DvlibError(f"class index(es) {np.flatnonzero(counts == 0).tolist()} have no training samples; "
                         "weighted cross-entropy needs every class")
    present = counts > 0
    w = np.zeros(num_classes)
    w[present] = len(labels) / (present.sum() * counts[present])
    return torch.tensor(w, dtype=torch.float32)


def _autocast(device: torch.device):
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def prepare(model: nn.Module, device: torch.device) -> nn.Module:
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    return model


def fit(model: nn.Module, cache: ImageCache, rows: torch.Tensor, labels: torch.Tensor, *, epochs: int,
        batch_size: int, lr: float, size: int, seed: int, device: torch.device | str = "auto",
        weight_decay: float = 0.0, class_weight: torch.Tensor | None = None, progress: bool = True,
        desc: str = "train") -> list[dict]:
    """Fine-tune ``model`` in place on ``rows`` of ``cache``; returns per-epoch loss and throughput."""
    device = resolve_device(device)
    if len(rows) == 0:
        raise DvlibError(f"{desc}: no training images")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    prepare(model, device)
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    crit = nn.CrossEntropyLoss(weight=None if class_weight is None else class_weight.to(device))
    history = []
    bar = tqdm(range(epochs), desc=desc, disable=not progress, leave=False, mininterval=2.0)
    for epoch in bar:
        t0 = time.perf_counter()
        total = torch.zeros((), device=device)
        n = 0
        for x, y in batches(cache, rows, labels, batch_size, size, train=True, generator=gen, device=device,
                            channels_last=device.type == "cuda", drop_last=True):
            with _autocast(device):
                loss = crit(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.detach() * len(y)
            n += len(y)
        loss_value = float(total) / max(n, 1)  # one sync per epoch
        dt = time.perf_counter() - t0
        history.append({"epoch": epoch + 1, "loss": loss_value, "images": n, "seconds": dt,
                        "img_per_s": n / dt if dt > 0 else float("nan")})
        bar.set_postfix(loss=f"{loss_value:.3f}")
    model.eval()
    return history


@torch.inference_mode()
def predict(model: nn.Module, cache: ImageCache, rows: torch.Tensor, *, size: int, batch_size: int = 256,
            device: torch.device | str = "auto") -> np.ndarray:
    """Class probabilities [N, C] (centre crop, eval mode)."""
    device = resolve_device(device)
    prepare(model, device)
    model.eval()
    outs = []
    for x, _ in batches(cache, rows, None, batch_size, size, train=False, device=device,
                        channels_last=device.type == "cuda"):
        with _autocast(device):
            outs.append(model(x).float())
    if not outs:
        return np.zeros((0, getattr(model, "num_classes", 0)), np.float32)
    return torch.cat(outs).softmax(-1).cpu().numpy()


def compute_metrics(y_true, probs: np.ndarray, classes: list[str]) -> dict:
    """accuracy, balanced accuracy, macro-F1, one-vs-rest AUC (macro over classes present), confusion."""
    from sklearn.metrics import accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score, roc_auc_score

    y_true = np.asarray(y_true, dtype=np.int64)
    k = len(classes)
    if len(y_true) == 0:
        raise DvlibError("cannot evaluate on an empty test set")
    # a collapsed model (e.g. negative BN variance) outputs NaN: count it, score it as uniform
    bad = ~np.isfinite(probs).all(axis=1)
    if bad.any():
        probs = probs.copy()
        probs[bad] = 1.0 / k
    y_pred = probs.argmax(1)
    aucs = []
    for c in range(k):
        pos = y_true == c
        if pos.any() and (~pos).any():
            aucs.append(roc_auc_score(pos, probs[:, c]))
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "macro_f1": float(f1_score(y_true, y_pred, average="macro", labels=list(range(k)), zero_division=0)),
        "auc_ovr": float(np.mean(aucs)) if aucs else float("nan"),
        "nonfinite_outputs": int(bad.sum()),
        "confusion": confusion_matrix(y_true, y_pred, labels=list(range(k))).tolist(),
    }


def evaluate(model: nn.Module, cache: ImageCache, rows: torch.Tensor, labels, classes: list[str], *,
             size: int, batch_size: int = 256, device: torch.device | str = "auto") -> dict:
    probs = predict(model, cache, rows, size=size, batch_size=batch_size, device=device)
    return compute_metrics(np.asarray(labels), probs, classes)
