"""A hospital as the ClientApp sees it, and the four things it does there. No Flower in this module.

A :class:`Hospital` is a :class:`dvlib.local.LocalData` with the consortium's settings: a site's own
folder (node config ``data=...``) or a simulated hospital of a run (``run=...``, or the server's
``run-dir`` in the simulation; hospital ``partition-id + 1``). What it runs is dvlib's own stages:

- :func:`data_vector`: ``dvlib.site.finetune_site`` (what ``dvlib site finetune`` runs);
- :func:`local_round`: ``dvlib.stages.finetune`` for one FedAvg/FedBN round;
- :func:`restore_visit`: ``dvlib.site.restore_site`` in memory, as the simulation's restore step;
- :func:`predict_test`: class probabilities on its test split (``dvlib.train.predict``).

Seeds (t: the replicate's training seed, L: the hospital's label, e.g. ``hospital_2``):

- data vector: seed ``derive(t, L)``, head seed t: step 02's fine-tuning exactly;
- FedAvg/FedBN round k of R (epochs/R epochs, a fresh Adam each round): ``derive(t, L)`` for k = 1,
  ``derive(t, L, "round", k)`` after; so R = 1 is step 02's fine-tuning;
- restore visit i: ``restore_site(seed=t)``, which trains with ``derive(t, i)``, as step 04.

Reuse (``reuse=True``), only where the result is that of the computation it replaces:

- a data vector: the run's step-02 vector file of this hospital when its settings, seed, split and
  pretrained weights are these ones (what ``finetune_site`` returned, as written);
- a first round from the pretrained weights over all epochs (R = 1): that vector applied to the
  pretrained weights, ``theta_pre + (theta - theta_pre)``, which is theta up to float32 rounding of
  the sum (tests/test_federated.py measures the difference);
- a first round from the pretrained weights that this process has trained before with the same
  settings and seed (FedBN after FedAvg at the same R): the kept result, bit for bit.
"""
from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from dvlib import models, stages
from dvlib.io import DvlibError
from dvlib.local import LocalData
from dvlib.seeds import derive

MEMO_SIZE = 16  # first-round results kept per process (FedBN's first round repeats FedAvg's)
_MEMO: OrderedDict[tuple, dict] = OrderedDict()
_HOSPITALS: dict[tuple, Hospital] = {}
_PRETRAINED: dict[tuple, tuple[dict, str]] = {}


@dataclass
class Hospital:
    local: LocalData
    settings: stages.TrainSettings
    train_seed: int
    device: torch.device
    replicate: object = None       # dvlib.experiment.Replicate of a simulated hospital, else None
    preset: str | None = None

    @property
    def label(self) -> str:
        return self.local.label

    def seed(self, round_: int = 1) -> int:
        """Training seed of FedAvg/FedBN round ``round_`` (1 = the data vector's and step 02's)."""
        return derive(self.train_seed, self.label) if round_ == 1 else derive(self.train_seed, self.label, "round", round_)

    def pretrained(self) -> tuple[dict, str]:
        """(the consortium's pretrained state dict, its backbone sha256)."""
        if self.replicate is not None:
            return self.replicate.pretrained()
        s = self.settings
        key = (s.arch, s.weights, s.head, len(self.local.classes), self.train_seed)
        if key not in _PRETRAINED:
            m = stages.pretrained_model(s, len(self.local.classes), self.train_seed)
            _PRETRAINED[key] = ({k: v.detach().clone() for k, v in m.state_dict().items()}, m.pretrained_sha256)
        return _PRETRAINED[key]

    def model(self, state: Mapping[str, torch.Tensor]) -> models.DVNet:
        """A network holding ``state`` (the replicate's reusable one for a simulated hospital)."""
        if self.replicate is not None:
            return self.replicate.model_from(dict(state), shared=True)
        s = self.settings
        net = models.build(s.arch, len(self.local.classes), weights="random", head=s.head)
        net.pretrained_sha256 = self.pretrained()[1]
        net.load_state_dict(dict(state), strict=True)
        return net.eval()

    def shard(self, subset: str):
        return self.local.shard(subset, self.settings.image_size, self.device)

    def step02_vector(self):
        """This hospital's vector file of the run (step 02), if it is what :func:`data_vector` would make."""
        from dvlib.files import load_vector

        if self.replicate is None or not self.replicate.path(self.label).exists():
            return None
        vf = load_vector(self.replicate.path(self.label))
        m = vf.meta
        same = (m.get("hyperparameters") == self.settings.hyperparameters(self.seed(1))
                and m["pretrained_sha256"] == self.pretrained()[1] and m["build_seed"] == self.train_seed
                and m["arch"] == self.settings.arch and m["head"] == self.settings.head
                and m.get("split") == self.local.split and list(m["classes"]) == list(self.local.classes)
                and vf.sample_count == len(self.local.images("train")))
        return vf if same else None


def open_hospital(node_config: Mapping, cfg: Mapping) -> Hospital:
    """The hospital of this SuperNode (kept per process). ``node_config``: ``data`` (a site's folder
    or dataset; optional ``manifest``, ``hospital``, ``site``, ``split-seed``, ``test-frac``) or
    ``run`` (a run folder; hospital ``partition-id + 1``); without either, the server's ``run-dir``
    (simulation); ``device`` overrides the server's. ``cfg``: the server's settings (``settings``, ``classes``, seeds, ``device``)."""
    from dvlib.device import resolve_device

    settings = stages.TrainSettings(**json.loads(cfg["settings"]))
    classes = json.loads(cfg["classes"])
    t, s = int(cfg["train-seed"]), int(cfg.get("split-seed", 0))
    run_dir = str(node_config.get("run", "") or cfg.get("run-dir", ""))
    key = (tuple(sorted((k, str(v)) for k, v in node_config.items())), run_dir, cfg["settings"], t, s, cfg.get("device"))
    if key in _HOSPITALS:
        return _HOSPITALS[key]
    device = resolve_device(node_config.get("device") or cfg.get("device", "cpu") or "cpu")  # a site may name its own
    if node_config.get("data"):
        from dvlib.local import open_local

        local = open_local(str(node_config["data"]), split_seed=int(node_config.get("split-seed", 0)),
                           test_frac=float(node_config.get("test-frac", 0.2)), classes=classes,
                           manifest=node_config.get("manifest") or None,
                           hospital=int(node_config["hospital"]) if "hospital" in node_config else None,
                           site=node_config.get("site") or None)
        h = Hospital(local, settings, t, device, None, cfg.get("preset") or None)
    elif run_dir:
        from dvlib.experiment import open_run, replicate

        run = open_run(Path(run_dir).name, root=Path(run_dir).parent, seeds=[s], train_seeds=[t], device=str(device))
        r = replicate(run, s, t, str(device))
        if r.settings != settings:
            raise DvlibError(f"run {run_dir}: its settings {asdict(r.settings)} are not the server's {asdict(settings)}")
        h = Hospital(r.local(int(node_config["partition-id"]) + 1), settings, t, device, r, run.settings["preset"])
    else:
        raise DvlibError("this SuperNode has no data: start it with --node-config 'data=\"/path/to/site\"' "
                         "(or run=\"/path/to/run\" for a simulated hospital)")
    if list(h.local.classes) != list(classes):
        raise DvlibError(f"{h.label}: classes {h.local.classes} are not the consortium's {classes}")
    if len(_HOSPITALS) > 64:  # a simulation actor serves every hospital of a replicate in turn
        _HOSPITALS.clear()
    _HOSPITALS[key] = h
    return h


def _cpu_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def data_vector(h: Hospital, reuse: bool = True):
    """(tau, metadata, reused file name or ""): ``finetune_site`` on this hospital, or its step-02 file."""
    from dvlib.site import finetune_site

    vf = h.step02_vector() if reuse else None
    if vf is not None:
        meta = {k: v for k, v in vf.meta.items() if k not in ("format_version", "dvlib_version")}
        return vf.tau, meta, vf.path.name
    model = h.replicate.pretrained_model(shared=True) if h.replicate is not None else None
    tau, meta = finetune_site(h.local, h.settings, seed=h.seed(1), build_seed=h.train_seed, device=h.device,
                              model=model, preset=h.preset)
    return tau, meta, ""


def _is_pretrained(h: Hospital, state: Mapping[str, torch.Tensor]) -> bool:
    pre = h.pretrained()[0]
    return list(state) == list(pre) and all(torch.equal(state[k], pre[k]) for k in pre)


def local_round(h: Hospital, start: Mapping[str, torch.Tensor], *, epochs: int, round_: int,
                reuse: bool = True) -> tuple[dict, dict]:
    """One FedAvg/FedBN round: ``epochs`` epochs of ``stages.finetune`` from ``start`` with the
    round's seed; returns (state dict, record: images, seed, loss, what was reused)."""
    settings = replace(h.settings, epochs=int(epochs))
    seed = h.seed(round_)
    info = {"site": h.label, "epochs": int(epochs), "seed": seed, "images": len(h.local.images("train")), "reused": ""}
    first = round_ == 1 and reuse and _is_pretrained(h, start)
    key = (h.label, h.train_seed, json.dumps(asdict(settings), sort_keys=True), seed, json.dumps(h.local.split, sort_keys=True))
    if first and key in _MEMO:
        return {k: v.clone() for k, v in _MEMO[key].items()}, {**info, "reused": "memory"}
    if first and epochs == h.settings.epochs and (vf := h.step02_vector()) is not None:
        pre = h.pretrained()[0]
        state = vf.tau.apply_to(models.pretrained_body(pre))
        return {k: state[k] for k in pre}, {**info, "reused": vf.path.name}
    model = h.model(start)
    hist = stages.finetune(model, h.shard("train"), settings, seed=seed, device=h.device,
                           desc=f"{h.label} round {round_}")
    state = _cpu_state(model)
    if first:
        _MEMO[key] = {k: v.clone() for k, v in state.items()}
        while len(_MEMO) > MEMO_SIZE:
            _MEMO.popitem(last=False)
    return state, {**info, "loss": float(hist[-1]["loss"]) if hist else float("nan")}


def restore_visit(h: Hospital, state: Mapping[str, torch.Tensor], meta: dict, what: str) -> tuple[dict, dict]:
    """One restore visit here: ``restore_site`` in memory, exactly as the simulation's restore step."""
    from dvlib.site import restore_site

    model = h.model(state)
    meta = restore_site(None, h.local, None, mode=what, seed=h.train_seed, model=model, meta=meta, device=h.device)
    return _cpu_state(model), meta


def predict_test(h: Hospital, state: Mapping[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """(probabilities [n, C], labels, image ids) of the model ``state`` on this hospital's test split."""
    from dvlib.train import predict

    model = h.model(state)
    shard = h.shard("test")
    probs = predict(model, shard.cache, shard.rows, size=h.settings.image_size,
                    batch_size=h.settings.eval_batch_size, device=h.device)
    return probs.astype(np.float32), shard.labels.numpy(), [shard.cache.images[int(r)] for r in shard.rows]
