"""Named settings for a whole run. CLI flags and notebook parameters override single fields.

``paper`` follows the paper's Table 4, whose row labels were lost in extraction. We read its seven
values, top to bottom, as: learning rate 1e-5, epochs 64, batch size 32, optimizer Adam, loss weighted
cross-entropy, hardware NVIDIA 3090, seed 3315. Image size (224 px) is ResNet50's standard input;
the paper does not state it. ``quick`` sizes the chain for 2 CPU cores (one seed of the whole chain
on the real PAD-UFES-20 subset in about 10 minutes); ``smoke`` runs in seconds on synthetic data.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from dvlib.io import DvlibError


@dataclass(frozen=True)
class Preset:
    """A run's settings. Its training knobs (arch ... eval_batch_size) are the ones every hospital
    trains with, :class:`dvlib.stages.TrainSettings` (built by ``TrainSettings.from_preset``); their
    defaults are stated here only. ``lam`` is checked where it is used (:mod:`dvlib.methods`)."""

    name: str
    dataset: str = "pad_ufes_20"
    arch: str = "efficientnet_lite0"
    weights: str = "imagenet"
    head: str = "append"
    image_size: int = 224
    epochs: int = 64
    batch_size: int = 32
    lr: float = 1e-5
    weight_decay: float = 0.0
    seed: int = 3315           # default training seed (the paper's); split seeds are given per run
    n_hospitals: int = 4
    scheme: str = "iid"
    alpha: float = 0.5
    test_frac: float = 0.2
    test_design: str = "per_hospital"  # or "shared": the same test patients for every scheme (dvlib.split)
    lam: float = 0.5
    eval_batch_size: int = 256
    n_patients: int = 160  # synthetic only

    def to_dict(self) -> dict:
        return asdict(self)

    def override(self, **kw) -> "Preset":
        names = {f.name for f in fields(self)}
        bad = sorted(k for k in kw if k not in names)
        if bad:
            raise DvlibError(f"unknown preset fields {bad}; valid: {sorted(names)}")
        out = replace(self, **{k: v for k, v in kw.items() if v is not None})
        out.validate()
        return out

    def validate(self) -> None:
        from dvlib.models import ARCHS, HEADS

        if self.arch not in ARCHS:
            raise DvlibError(f"unknown arch {self.arch!r}; valid: {', '.join(ARCHS)}")
        if self.head not in HEADS:
            raise DvlibError(f"unknown head mode {self.head!r}; valid: {', '.join(HEADS)}")
        for name in ("image_size", "epochs", "batch_size", "n_hospitals", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise DvlibError(f"{name} must be >= 1, got {getattr(self, name)}")
        if int(self.batch_size) < 2:  # BatchNorm cannot train on one image
            raise DvlibError(f"batch_size must be >= 2, got {self.batch_size}")
        if not self.lr > 0:
            raise DvlibError(f"lr must be > 0, got {self.lr}")
        if not 0 < self.test_frac < 1:
            raise DvlibError(f"test_frac must be in (0, 1), got {self.test_frac}")
        from dvlib.split import SCHEMES, TEST_DESIGNS

        if self.scheme not in SCHEMES:
            raise DvlibError(f"unknown split scheme {self.scheme!r}; valid: {', '.join(SCHEMES)}")
        if self.test_design not in TEST_DESIGNS:
            raise DvlibError(f"unknown test design {self.test_design!r}; valid: {', '.join(TEST_DESIGNS)}")


PRESETS: dict[str, Preset] = {
    "paper": Preset("paper", arch="resnet50", image_size=224, epochs=64, batch_size=32, lr=1e-5, seed=3315),
    # eval batch 32: on 2 CPU cores, evaluation runs about 1.3x faster than at 128 (benchmarks/README.md)
    "quick": Preset("quick", arch="efficientnet_lite0", image_size=128, epochs=8, batch_size=32, lr=2e-4,
                    seed=0, eval_batch_size=32),
    "smoke": Preset("smoke", dataset="synthetic", arch="smallcnn", weights="random", image_size=56,
                    epochs=8, batch_size=32, lr=3e-3, seed=0, n_patients=160, eval_batch_size=256),
}


def get_preset(name: str, **overrides) -> Preset:
    if name not in PRESETS:
        raise DvlibError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name].override(**overrides)
