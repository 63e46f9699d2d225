"""`RayEvaluator`: sweeps' and searches' evaluations on Ray workers, each holding one replica of the model.

The driver puts what every evaluation needs into Ray's object store once (the factors, the evaluation windows
and the reference, the channel orders of pruned MLPs) and starts `workers` actors; each actor loads the model
from the directory the driver already located, builds its own `CompressionSession` from those objects, and
then measures tasks (`engine.compression.evaluators.EvaluationTask`) one at a time with one torch thread.
Results come back as they finish (`ray.wait`); the caller stores them, so a worker never touches DuckDB.

A worker that dies is restarted (its model loaded again) and its task retried by Ray (`max_restarts`,
`max_task_retries`); a killed driver resumes its sweep or study from the store as a serial run does.
`--workers N` starts a local Ray for the run (N CPUs, stopped at the end); `--ray-address` joins an existing
cluster (every node must see the model directory at the same path).
"""

from __future__ import annotations

import os
from typing import Iterator, Optional, Sequence

import torch

from engine.compression.evaluators import EvaluationTask, Evaluated, SerialEvaluator, evaluate_task
from engine.compression.session import CompressionSession
from engine.errors import RankScopeError
from engine.metrics import ReferenceDistribution

TASKS_PER_WORKER = 2  # in flight per worker, so a worker never waits for the driver between tasks
RESTARTS = 3  # a dead worker is started again this many times; its task is retried as often


def open_evaluator(session: CompressionSession, workers: int = 1, address: Optional[str] = None,
                   threads_per_worker: int = 1):
    """The evaluator a command asked for: in this process (`workers` 1 and no address) or a Ray pool."""
    if workers < 1:
        raise RankScopeError(f"--workers must be at least 1 (1 evaluates in this process), got {workers}.")
    if workers == 1 and address is None:
        return SerialEvaluator(session)
    return RayEvaluator(session, workers, address, threads_per_worker)


class _Worker:
    """One model replica (a Ray actor; see `RayEvaluator`)."""

    def __init__(self, model_dir: str, model_id: str, fingerprint: str, method: str, texts: dict, factorization,
                 windows, reference, channel_orders: dict, threads: int, die_once: Optional[str] = None,
                 dtype: str = "float32"):
        from engine.models.device import Placement
        from engine.models.loading import load_located
        from engine.texts.settings import TextSettings
        from pathlib import Path

        torch.set_num_threads(threads)
        self.die_once = die_once
        # workers are CPU actors; the driver's forward dtype keeps their results those of the driver's keys
        loaded = load_located(Path(model_dir), model_id, fingerprint, placement=Placement("cpu", dtype))
        self.session = CompressionSession(None, loaded, method, TextSettings.from_dict(texts), None, None,
                                          factorization, windows, None, reference)
        self.session.adopt_channel_orders(channel_orders)
        self.window_sets: dict[str, tuple[torch.Tensor, ReferenceDistribution]] = {}

    def add_windows(self, name: str, windows, reference) -> None:
        self.window_sets[name] = (windows, reference)

    def evaluate(self, task: EvaluationTask) -> Evaluated:
        if self.die_once and not os.path.exists(self.die_once):  # tests: this worker dies in its first task, once
            open(self.die_once, "w").close()
            os._exit(1)
        return evaluate_task(self.session, task, self.window_sets)


def _check_reachable(address: str, timeout: float = 3.0) -> None:
    """Refuse at once an address no Ray head answers on (host:port, or ray://host:port)."""
    import socket

    host_port = address.split("://", 1)[-1]
    host, _, port = host_port.rpartition(":")
    if not host or not port.isdigit():
        raise RankScopeError(f"--ray-address must be host:port (of a running `ray start --head`), got '{address}'.")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise RankScopeError(f"Could not join the Ray cluster at '{address}': nothing answers there ({exc}). Start "
                             "one with `ray start --head` (it prints the address), or leave --ray-address out to "
                             "start a local Ray for this run.") from exc


class RayEvaluator:
    """Tasks measured on `workers` Ray actors, results in the order they finish."""

    def __init__(self, session: CompressionSession, workers: int, address: Optional[str] = None,
                 threads_per_worker: int = 1, die_once: Optional[str] = None):
        import ray

        self.workers, self._ray = workers, ray
        self._started_ray = False
        if not ray.is_initialized():
            if address is not None:
                _check_reachable(address)  # Ray itself retries an unreachable address for minutes
            try:
                if address is None:
                    # Ray nices its workers (15) to keep its own processes responsive; here they are the work
                    os.environ.setdefault("RAY_worker_niceness", "0")
                    ray.init(num_cpus=workers * threads_per_worker, include_dashboard=False, log_to_driver=False)
                else:
                    ray.init(address=address, include_dashboard=False, log_to_driver=False)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                where = f"the Ray cluster at '{address}'" if address else "a local Ray"
                raise RankScopeError(f"Could not start or join {where}: {exc}. Check the address (host:port of a "
                                     "running `ray start --head`), or leave --ray-address out to start a local "
                                     "Ray for this run.") from exc
            self._started_ray = True
        orders = session.channel_orders()  # a study that prunes computes its order before the pool starts
        # kept for the pool's life: a restarted worker is built again from the same objects
        self._shared = shared = [ray.put(x) for x in (session.factorization, session.windows, session.reference)]
        self._window_refs: list = []
        actor = ray.remote(num_cpus=threads_per_worker, max_restarts=RESTARTS, max_task_retries=RESTARTS)(_Worker)
        loaded = session.loaded
        self._actors = [actor.remote(str(loaded.path), loaded.model_id, loaded.fingerprint, session.method,
                                     session.texts.to_dict(), *shared, orders, threads_per_worker, die_once,
                                     loaded.dtype)
                        for _ in range(workers)]

    def register_windows(self, name: str, windows: torch.Tensor, reference: ReferenceDistribution) -> None:
        windows_ref, reference_ref = self._ray.put(windows), self._ray.put(reference)
        self._window_refs += [windows_ref, reference_ref]
        self._ray.get([a.add_windows.remote(name, windows_ref, reference_ref) for a in self._actors])

    def map_unordered(self, tasks: Sequence[EvaluationTask]) -> Iterator[Evaluated]:
        ray = self._ray
        queue = list(tasks)
        pending: dict = {}  # object ref -> actor
        load = {i: 0 for i in range(len(self._actors))}

        def submit() -> None:
            while queue:
                index = min(load, key=load.get)
                if load[index] >= TASKS_PER_WORKER:
                    return
                ref = self._actors[index].evaluate.remote(queue.pop(0))
                pending[ref], load[index] = index, load[index] + 1

        submit()
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            load[index] -= 1
            try:
                evaluated = ray.get(done[0])
            except ray.exceptions.RayError as exc:
                raise RankScopeError(f"A worker failed a task after {RESTARTS} retries: {exc}") from exc
            submit()
            yield evaluated

    def close(self) -> None:
        for actor in self._actors:
            self._ray.kill(actor)
        self._actors = []
        if self._started_ray:
            self._ray.shutdown()
