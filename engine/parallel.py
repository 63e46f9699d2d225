"""`parallel_map`: many small independent linear-algebra jobs spread over the cores, one LAPACK thread each.

Factorisations and spectra run hundreds of eigh/SVD calls on matrices of a few hundred rows. Two OpenMP
threads on one such call gain little, and lose a lot when the cores are busy elsewhere (the threads wait on
each other: single calls that take 0.1 s were seen taking 8 s on this shared 2-core machine), so the calls
are spread over the cores instead.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional, TypeVar

import torch

Item = TypeVar("Item")
Result = TypeVar("Result")
_THREADS_LOCK = threading.Lock()


def _one_intra_op_thread() -> None:
    with _THREADS_LOCK:  # set_num_threads also writes process-wide state (default, oneDNN cache): one at a time
        torch.set_num_threads(1)


def parallel_map(fn: Callable[[Item], Result], items: Iterable[Item],
                 on_result: Optional[Callable[[Result], None]] = None) -> list[Result]:
    """`[fn(x) for x in items]`, run on `torch.get_num_threads()` worker threads of one intra-op thread each.

    torch keeps the thread count per thread (OpenMP and MKL), so the calling thread keeps its own; the
    process-wide default for threads started later, which the workers' setting also writes, is put back
    afterwards. With one thread (or one item) it runs inline. `on_result` is called in the calling thread with
    each result, in order, as soon as it and those before it are done (for progress bars).
    """
    items = list(items)
    saved = torch.get_num_threads()
    workers = min(saved, len(items))
    results: list[Result] = []
    if workers <= 1:
        for item in items:
            results.append(fn(item))
            if on_result is not None:
                on_result(results[-1])
        return results
    try:
        with ThreadPoolExecutor(workers, thread_name_prefix="parallel", initializer=_one_intra_op_thread) as pool:
            for result in pool.map(fn, items):
                results.append(result)
                if on_result is not None:
                    on_result(result)
            return results
    finally:
        with _THREADS_LOCK:
            torch.set_num_threads(saved)
