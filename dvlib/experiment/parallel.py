"""Fine-tuning spread over devices: one worker process per device, each taking the next model.

The models are independent and each one's seed depends only on (training seed, model name), so where
a model trains changes nothing but the device's own arithmetic.
"""
from __future__ import annotations

import os
import time
from typing import Callable, Sequence

import torch

from dvlib.io import DvlibError

_WORKER: dict = {}


def finetune_devices(run_device: str = "auto", requested: Sequence[str] | None = None,
                     cuda_count: int | None = None) -> list[str]:
    """Where fine-tuning runs: ``requested`` if given (each checked), otherwise every visible GPU when
    ``run_device`` is ``auto`` and more than one is visible, otherwise ``run_device`` alone."""
    from dvlib.device import resolve_device

    if requested:
        devs = [str(d) for d in requested]
        for d in devs:
            try:
                resolve_device(d)
            except (DvlibError, RuntimeError) as e:
                raise DvlibError(f"devices: {d!r} is not usable ({e})") from None
            if d.startswith("cuda:") and int(d.split(":")[1]) >= torch.cuda.device_count():
                raise DvlibError(f"devices: {d!r} is not usable ({torch.cuda.device_count()} GPU(s) visible)")
        return devs
    n = torch.cuda.device_count() if cuda_count is None else cuda_count
    if str(run_device) == "auto" and n > 1:
        return [f"cuda:{i}" for i in range(n)]
    return [str(run_device)]


def _init(device_queue, threads: int) -> None:
    dev = device_queue.get()
    _WORKER["device"] = dev
    if dev.startswith("cuda:"):
        torch.cuda.set_device(int(dev.split(":")[1]))
    if dev == "cpu":
        torch.set_num_threads(threads)


def _job(fn: Callable, args: tuple) -> tuple[str, float]:
    dev = _WORKER["device"]
    try:
        return dev, fn(*args, dev)
    except Exception as e:  # noqa: BLE001 - re-raised with where it happened; the traceback is chained
        raise DvlibError(f"fine-tuning {args[-1]} (seeds {args[1:-1]}) on {dev} failed: {type(e).__name__}: {e}") from e


def run_parallel(fn: Callable, jobs: list[tuple], devices: list[str], log=print, name: Callable = str) -> None:
    """``fn(*job, device)`` for every job, one spawned worker process per device (CUDA cannot be used
    in forked children); the first failure stops the rest and is raised. ``name(job)`` labels a job in
    the log."""
    import multiprocessing as mp
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    for d in devices:
        q.put(d)
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(len(devices), mp_context=ctx, initializer=_init, initargs=(q, threads)) as pool:
        futures = {pool.submit(_job, fn, job): job for job in jobs}
        done, _ = wait(futures, return_when=FIRST_EXCEPTION)
        for f in done:
            if f.exception() is not None:
                pool.shutdown(cancel_futures=True)
                raise f.exception()
        for f, job in futures.items():
            dev, sec = f.result()
            log(f"{name(job)}: {sec:.1f} s on {dev}")
    log(f"{len(jobs)} models on {len(devices)} devices in {time.perf_counter() - t0:.1f} s")
