"""Progress of long work, where the person waiting can see it.

In a terminal or JupyterLab: a tqdm bar (widgets in JupyterLab, with ipywidgets installed). Under
``dvlib run`` the kernels set ``DVLIB_PROGRESS_FILE``: each update is then one line appended to that
file, which ``dvlib run`` prints as it comes, and the executed report stays free of progress noise.
"""
from __future__ import annotations

import os
import time

ENV = "DVLIB_PROGRESS_FILE"


def note(text: str) -> None:
    """One line of progress: to the progress file under ``dvlib run``, else printed."""
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(text.rstrip("\n") + "\n")
    else:
        print(text, flush=True)


class Bar:
    """``total`` steps (epochs) of one piece of work named ``desc``; ``step(**numbers)`` after each."""

    def __init__(self, total: int, desc: str, enabled: bool = True):
        self.total, self.desc, self.done, self.t0 = total, desc, 0, time.perf_counter()
        self.file = os.environ.get(ENV) if enabled else None
        self.tqdm = None
        if enabled and not self.file:
            from tqdm.auto import tqdm

            self.tqdm = tqdm(total=total, desc=desc, leave=False, mininterval=1.0)

    def step(self, **numbers) -> None:
        self.done += 1
        shown = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in numbers.items()}
        if self.tqdm is not None:
            self.tqdm.update(1)
            if shown:
                self.tqdm.set_postfix(**shown)
        elif self.file:
            elapsed = time.perf_counter() - self.t0
            eta = elapsed / self.done * (self.total - self.done)
            extra = "".join(f", {v} img/s" if k == "img_per_s" else f", {k} {v}" for k, v in shown.items())
            note(f"{self.desc}: epoch {self.done}/{self.total}{extra}, {elapsed:.0f} s, ETA {eta:.0f} s")

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()
