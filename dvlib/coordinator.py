"""The coordinator's side: check the hospitals' vector files, rebuild the pretrained model, merge.

``dvlib merge`` is :func:`merge_files`; the simulation's merge step calls the same function on the
simulated hospitals' files. Inputs are files other institutions made: every problem is collected and
reported at once, a file given twice (or a byte-identical copy) is refused, metadata never names a
path (a weights file is looked up by name only in folders the coordinator names), and the output
never replaces an input.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Sequence

from dvlib import custody, merging, models, screening
from dvlib.checks import bare_name, fail, layout_problems, same_file
from dvlib.files import BUILTIN_WEIGHTS, VectorFile, is_vector_file, load_model, load_vector, save_model
from dvlib.io import DvlibError, check_writable

SAME = ("pretrained_sha256", "arch", "head", "image_size")  # what every site must share


def _lines(e: DvlibError) -> list[str]:
    text = str(e)
    return [ln.strip()[2:] for ln in text.splitlines() if ln.strip().startswith("- ")] or [text]


def load_vectors(paths: Sequence[str | os.PathLike]) -> list[VectorFile]:
    """Load every vector file; one :class:`DvlibError` lists the files that cannot be read and every
    reason those that can cannot be merged together."""
    paths = [Path(p) for p in paths]
    if len(paths) < 2:
        raise DvlibError(f"need at least 2 site vector files to merge, got {len(paths)}: {[str(p) for p in paths]}")
    problems, vfs = [], []
    for p in paths:
        try:
            vfs.append(load_vector(p))
        except DvlibError as e:
            problems += _lines(e)
    seen: dict[str, Path] = {}
    contents: dict[str, Path] = {}
    labels: dict[str, Path] = {}
    for vf in vfs:
        first = seen.setdefault(vf.sha256, vf.path)
        if first is not vf.path:
            how = "given twice" if first.resolve() == vf.path.resolve() else f"the same bytes as {first}"
            problems.append(f"{vf.path}: {how}; each site counts once")
            continue
        # a changed metadata byte or a new label does not make another site
        twin = contents.setdefault(screening.content_sha256(vf.tau), vf.path)
        if twin is not vf.path:
            problems.append(f"{vf.path}: the same tensors as {twin} (whatever the metadata says); each site counts once")
        site = vf.meta.get("site")
        if site is not None and labels.setdefault(site, vf.path) is not vf.path:
            problems.append(f"{vf.path}: site label {site!r} is also the label of {labels[site]}; each site counts once")
    ref = vfs[0] if vfs else None
    for vf in vfs[1:]:
        for k in SAME:
            if vf.meta[k] != ref.meta[k]:
                why = ": fine-tuned from other weights" if k == "pretrained_sha256" else ""
                problems.append(f"{vf.path}: {k} {vf.meta[k]!r} differs from {ref.path} ({ref.meta[k]!r}){why}")
        if vf.classes != ref.classes:
            how = "the same classes in a different order" if sorted(vf.classes) == sorted(ref.classes) else "different classes"
            problems.append(f"{vf.path}: {how}: {vf.classes} vs {ref.classes} in {ref.path}")
    if len(vfs) > 1:
        problems += layout_problems([v.tau.tensors for v in vfs], [str(v.path) for v in vfs])
    fail(problems, f"cannot merge {len(paths)} vector files")
    return vfs


def _weights_file(spec: str, weights_dirs: Sequence[str | os.PathLike]) -> str:
    name = bare_name(spec, "metadata 'weights'")
    for d in weights_dirs:
        if (Path(d) / name).is_file():
            return str(Path(d) / name)
    where = ", ".join(map(str, weights_dirs)) or "no folder given"
    raise DvlibError(f"the sites' pretrained weights file {name!r} is not in the weights folders ({where}); "
                     "pass --weights PATH or --weights-dir DIR")


def rebuild_pretrained(meta: dict, weights: str | None = None,
                       weights_dirs: Sequence[str | os.PathLike] = ()) -> models.DVNet:
    """The sites' pretrained model from metadata (arch, head, classes, build seed) and weights: the
    coordinator's ``weights`` (imagenet, random or a path), else the metadata's name looked up in
    ``weights_dirs``; refused unless its sha256 is the one the sites recorded."""
    spec = weights or (meta["weights"] if meta["weights"] in BUILTIN_WEIGHTS else _weights_file(meta["weights"], weights_dirs))
    model = models.build(meta["arch"], len(meta["classes"]), weights=spec, head=meta["head"], seed=meta["build_seed"])
    if model.pretrained_sha256 != meta["pretrained_sha256"]:
        raise DvlibError(f"rebuilt pretrained weights (arch {meta['arch']}, weights {spec!r}, seed {meta['build_seed']}) "
                         f"have sha256 {model.pretrained_sha256}, but the sites fine-tuned from "
                         f"{meta['pretrained_sha256']}; pass --weights PATH to the exact weights they used")
    return model


def check_out(out: str | os.PathLike, inputs: Sequence[str | os.PathLike], what: str) -> Path:
    """``out`` as a path that ends in .safetensors and is none of ``inputs`` (also not through a link)."""
    out = Path(out)
    if out.is_dir():
        raise DvlibError(f"{out}: is a folder; give a file name for {what}")
    if out.suffix != ".safetensors":
        raise DvlibError(f"{out}: {what} must end in .safetensors")
    check_writable(out)
    for p in map(Path, inputs):
        if same_file(out, p):
            raise DvlibError(f"{out}: is also an input ({p}); write {what} to another file")
    return out


def fit_problems(tensors: dict, model: models.DVNet, where: str) -> list[str]:
    """Every key, shape and dtype of a file's ``tensors`` (a model's state dict, or a site's vector:
    the same keys) that the network its metadata describes would not take."""
    return layout_problems([model.state_dict(), tensors], [f"the {model.arch} network of the metadata", where])


def count_problems(vf: VectorFile) -> list[str]:
    """A site's sample count must be what its class counts add up to (the weight it claims)."""
    counts = vf.meta.get("train_class_counts")
    if not isinstance(counts, dict):
        return [f"{vf.path}: metadata lacks 'train_class_counts', so its sample_count {vf.sample_count} cannot be checked"]
    total = sum(counts.values())  # each a non-negative integer (dvlib.metadata)
    return [] if total == vf.sample_count else \
        [f"{vf.path}: sample_count {vf.sample_count} is not the sum of its train_class_counts ({total})"]


def merge_warnings(vfs: Sequence[VectorFile]) -> list[str]:
    """What differs between mergeable files without making the merge wrong, for the reader."""
    out = []
    versions = {vf.path.name: vf.meta.get("dvlib_version") for vf in vfs}
    if len({json.dumps(v) for v in versions.values()}) > 1:
        out.append("written by different dvlib versions: " + ", ".join(f"{f} {v}" for f, v in versions.items()))
    if len({vf.meta["build_seed"] for vf in vfs}) > 1:
        out.append("the sites' new heads started from different seeds: their average is less meaningful")
    for k in ("epochs", "lr", "batch_size", "weight_decay", "optimizer", "loss"):
        vals = {vf.path.name: (vf.meta.get("hyperparameters") or {}).get(k) for vf in vfs}
        if len({json.dumps(v) for v in vals.values()}) > 1:
            out.append(f"sites trained with different {k}: " + ", ".join(f"{f} {v}" for f, v in vals.items()))
    return out


def merge_files(paths: Sequence[str | os.PathLike], out: str | os.PathLike, *, method: str = "data_vector",
                lam: float | None = None, bn_buffers: str = "mean", seed: int = 0, weights: str | None = None,
                weights_dirs: Sequence[str | os.PathLike] = (), pretrained=None, keep_outliers: bool = False,
                **opts) -> dict:
    """Merge site vector files into one model file (``dvlib merge``); returns its metadata.

    ``pretrained``: the already rebuilt pretrained model (the simulation keeps one), checked like a
    rebuilt one. Method ``weighted`` weighs the sites by their training sample counts. The inputs
    are screened first (:mod:`dvlib.screening`): an outlier is refused unless ``keep_outliers``;
    the statistics are kept in the metadata (``screening``); the screen never changes the weights.
    """
    out = check_out(out, [*paths, *([weights] if weights and weights not in BUILTIN_WEIGHTS else [])],
                    "the merged model")
    vfs = load_vectors(paths)
    ref = vfs[0].meta
    model = pretrained if pretrained is not None else rebuild_pretrained(ref, weights, weights_dirs)
    if model.pretrained_sha256 != ref["pretrained_sha256"]:
        raise DvlibError(f"the pretrained model given has sha256 {model.pretrained_sha256}, the sites' is "
                         f"{ref['pretrained_sha256']}")
    # the files agree with each other (load_vectors): the first fitting the network makes the merge fit it
    fail(fit_problems(vfs[0].tau.tensors, model, str(vfs[0].path)),
         "a vector file does not fit its metadata; nothing was written")
    pre = model.state_dict()
    fail([line for vf in vfs for line in count_problems(vf)], "cannot merge: counts that do not add up")
    report_in = screening.screen([f"{vf.path} (site {vf.meta.get('site')!r})" for vf in vfs], [vf.tau for vf in vfs],
                                 pre, keep_outliers=keep_outliers)
    for s, vf in zip(report_in["sites"], vfs):  # the file records names, never the coordinator's paths
        s["label"] = f"{vf.path.name} (site {vf.meta.get('site')!r})"
    report_in["kept_outliers"] = [s["label"] for s in report_in["sites"] if s["outlier"]]
    counts = [vf.sample_count for vf in vfs]
    state, report = merging.merge(pre, [vf.tau for vf in vfs], method=method, lam=lam,
                                  bn_buffers=bn_buffers, seed=seed, weights=counts if method == "weighted" else None,
                                  **opts)
    report_in["effective_step"] = screening.effective_step(state, pre, [vf.tau for vf in vfs])
    step_note = screening.step_warning(report_in["effective_step"], method, report["lam"], len(vfs))
    report_in["effective_step_warning"] = step_note
    splits = {json.dumps(vf.meta.get("split"), sort_keys=True) for vf in vfs}
    meta = {k: ref[k] for k in ("arch", "head", "build_seed", "classes", "pretrained_sha256", "image_size")}
    meta.update(kind="merged", weights=ref["weights"] if not weights else
                (weights if weights in BUILTIN_WEIGHTS else Path(weights).name),
                method=method, lam=report["lam"], bn_buffers=bn_buffers, seed=int(seed), options=report["options"],
                sample_counts=counts, negative_variance_layers=report["negative_variance_layers"],
                sources=[{"file": vf.path.name, "sha256": vf.sha256, "site": vf.meta.get("site"),
                          "sample_count": vf.sample_count, "metrics": vf.meta.get("metrics"),
                          "hyperparameters": vf.meta.get("hyperparameters")} for vf in vfs],
                split=json.loads(splits.pop()) if len(splits) == 1 else None,  # reused by restore/evaluate
                # exact zeros are legitimate (dead channels of the pretrained network); recorded for the reader
                zero_variance_layers=sorted(k for k, v in state.items() if k.endswith("running_var") and v.numel()
                                            and float(v.min()) == 0.0),
                restore_visits=[], warnings=merge_warnings(vfs) + ([step_note] if step_note else []),
                screening=report_in)
    meta["custody"] = custody.record(state)  # site restore binds to it
    save_model(out, state, meta)
    return meta


def open_model(path: str | os.PathLike, weights: str | None = None,
               weights_dirs: Sequence[str | os.PathLike] = ()) -> tuple[models.DVNet, dict]:
    """A ready model and its metadata from a model file, or from a site's vector file (applied to
    the rebuilt pretrained weights)."""
    path = Path(path)
    if is_vector_file(path):
        vf = load_vector(path)
        model = rebuild_pretrained(vf.meta, weights, weights_dirs)
        fail(fit_problems(vf.tau.tensors, model, str(path)), f"bad model file {path}")
        state, meta = vf.tau.apply_to(model.state_dict()), vf.meta
    else:
        mf = load_model(path)
        state, meta = mf.state, mf.meta
        model = models.build(meta["arch"], len(meta["classes"]), weights="random", head=meta["head"])
        fail(fit_problems(state, model, str(path)), f"bad model file {path}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise DvlibError(f"{path}: tensors do not fit {meta['arch']} (head {meta['head']!r}, "
                         f"{len(meta['classes'])} classes): {e}") from None
    model.eval()
    return model, meta
