"""Where a process's torch work runs, for OpenMP's sake (CPU).

Every thread that runs parallel torch work keeps its own OpenMP team for as long as it lives, and
libgomp counts the threads of every team: once they outnumber the cores, it stops letting idle
workers spin between parallel regions and puts them to sleep, so every region pays a wake-up.
Measured on 2 cores (demo-l, bf16 packages, 2 threads): a model loaded and warmed on the main
thread and served from another thread (the serving cell's scheduler thread) decoded 56 tok/s;
loaded on a thread that then ended, 585 tok/s, as fast as serving from the loading thread."""
from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def on_passing_thread(fn: Callable[..., T], *args, **kw) -> T:
    """fn(*args, **kw) on a thread that ends with it, at the caller's torch thread count (OpenMP's
    count is per thread): its OpenMP team goes with it, and the thread that serves is the only one
    with a team."""
    n, out = torch.get_num_threads(), {}

    def run():
        torch.set_num_threads(n)
        try:
            out["value"] = fn(*args, **kw)
        except BaseException as e:  # noqa: BLE001 - raised again in the caller
            out["error"] = e

    t = threading.Thread(target=run, name="s2d-load")
    t.start()
    t.join()
    if "error" in out:
        raise out["error"]
    return out["value"]
