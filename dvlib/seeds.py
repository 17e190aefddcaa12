"""Seeds for each piece of work, derived from a run's seeds by name.

A model's training seed depends only on (training seed, model name), so where and in which order
models are trained never changes them; the formula is one line, written once.
"""
from __future__ import annotations

import hashlib


def derive(base: int, *names: object) -> int:
    """A 31-bit seed fixed by ``base`` and ``names`` alone (sha256 of their text)."""
    text = "/".join(str(x) for x in (int(base), *names))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") & 0x7FFFFFFF
