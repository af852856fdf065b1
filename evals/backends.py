"""Where a run's cells execute: in this process (`local`, the default) or on Ray actors (`ray`: the GPUs of a node,
or a cluster started with `ray start`, KubeRay or inside a Slurm allocation). Either way a worker loads its model once
and runs many cells, and the driver is the only writer of records.jsonl: every finished cell comes back to it and is
appended and fsynced before the next.

On Ray a worker that dies (killed, out of memory, node lost) has its in-flight cells re-run on a fresh worker, up to
`retries` times, after which the cell is recorded as `error` with the reason (a resumed run tries it again); an
allocation failure inside a cell is an outcome (`allocation_failure`), never retried; any other exception in a cell
stops the run, as it does locally. Ctrl-C (or any error) kills the workers and, when the run started Ray itself,
stops it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import socket
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm import tqdm

from ..provenance import device_name
from .config import ReportConfig
from .cost import calibrate
from .harness import Harness

BACKENDS = ("local", "ray")
Job = tuple[int, dict]  # (index of the run's ReportConfig, cell)


@dataclass(frozen=True)
class Backend:
    name: str = "local"
    address: str | None = None  # ray: None starts Ray on this machine; "auto" or HOST:PORT joins a running cluster
    workers: int | None = None  # ray: actors to start (default: as many as the cluster's resources hold)
    gpus_per_worker: float | None = None  # default: 1 when the run's device is CUDA, else 0
    cpus_per_worker: float = 1
    retries: int = 2  # re-runs of a cell whose worker died, before it is recorded as `error`

    def __post_init__(self):
        if self.name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.name!r}")
        if self.name == "local" and (self.address or self.workers or self.gpus_per_worker):
            raise ValueError("--address, --workers and --gpus-per-worker need --backend ray")
        if self.workers is not None and self.workers <= 0:
            raise ValueError(f"workers must be a positive number of Ray actors, got {self.workers}")
        if self.cpus_per_worker <= 0 or (self.gpus_per_worker or 0) < 0 or self.retries < 0:
            raise ValueError("cpus_per_worker must be positive, gpus_per_worker and retries not negative")

    def record(self) -> dict:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @property
    def threads(self) -> int:
        """Torch threads of a Ray worker: the CPUs it holds, not every core of its node."""
        return max(1, int(self.cpus_per_worker))


class Worker:
    """One model loaded once, many cells: in this process (local) or as a Ray actor. A cell of another model loads
    that model in place of the last (cells arrive grouped by model, so that happens once per model)."""

    def __init__(self, config: dict, threads: int | None = None):
        if threads:  # a Ray actor computes on the CPUs it was given, not on every core of the node
            torch.set_num_threads(threads)
        self._load(config)

    def _load(self, config: dict) -> None:
        self.harness = None  # the last model goes before the next one loads
        self.config, self.harness = config, Harness(ReportConfig.from_dict(config))

    def describe(self) -> dict:
        """What the records' meta says about the machine: its device and dtypes (a Ray worker's, not the driver's)."""
        return {
            "device": device_name(self.harness.config.device),
            "host": socket.gethostname(),
            **self.harness.dtypes(),
        }

    def calibrate(self) -> dict:
        """The timing the run's estimate is made from, on this worker's device (Calibration.record)."""
        return calibrate(self.harness.model, device_name(self.harness.config.device)).record()

    def run(self, config: dict, cell: dict) -> dict:
        if config != self.config:
            self._load(config)
        started = time.perf_counter()
        record = self.harness.run(cell)
        return {**record, "cell_s": round(time.perf_counter() - started, 4)}


def units(jobs: list[Job], configs: list[dict]) -> list[list[Job]]:
    """Jobs that run best on one worker, in order: a task and length's recall cells (its cases run in batches, one
    prefill serving every strategy; a case's strategies when cases run one at a time), a length's latency cells
    (each ratio against `full` timed on one device), one fidelity cell each."""

    def group(job: Job) -> tuple:
        index, cell = job
        if cell["kind"] == "recall":
            case = (cell["depth"], cell["seed"]) if configs[index]["recall_batch"] == 1 else ()
            return index, "recall", cell["task"], cell["length"], cell["question"], *case
        return index, cell["kind"], cell.get("length"), cell["strategy"] if cell["kind"] == "fidelity" else None

    grouped: dict[tuple, list[Job]] = {}
    for job in jobs:
        grouped.setdefault(group(job), []).append(job)
    return list(grouped.values())


class Progress:
    """One bar over a run's work, advanced by each finished item's estimated seconds (`costs`, by key: a cell's id, a
    strategy's name), so its ETA is the estimate left over the rate observed since the start (not a recent window:
    items differ in cost, and the average corrects the estimate's scale whatever it is); its postfix counts items
    done, failed and running. For the report's runners it also keeps what each worker did."""

    def __init__(self, costs: dict[str, float], desc: str, unit: str = "cells"):
        self.costs, self.items, self.unit = dict(costs), len(costs), unit
        self.finished = self.failed = 0
        self.bar = tqdm(
            total=sum(costs.values()),
            desc=desc,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}",
        )
        self.per_worker = collections.defaultdict(lambda: {"cells": 0, "busy_s": 0.0, "where": ""})
        self._postfix(0)

    def _postfix(self, running: int) -> None:
        self.bar.set_postfix_str(
            f"{self.unit} {self.finished}/{self.items}, failed {self.failed}, running {running}", refresh=False
        )

    def advance(self, key: str, failed: bool = False, running: int = 0) -> None:
        """`key` finished: the bar moves by its estimated seconds."""
        self.finished += 1
        self.failed += failed
        self._postfix(running)
        cost = self.costs.pop(key, 0.0)
        # the last lands exactly on the total (floats summed in another order may overshoot it)
        self.bar.update(cost if self.costs else self.bar.total - self.bar.n)

    def done(self, record: dict, worker: str, where: str, running: int) -> None:
        stats = self.per_worker[worker]
        stats["cells"] += 1
        stats["busy_s"] += record.get("cell_s", 0.0)
        stats["where"] = where
        self.advance(record["id"], record.get("outcome") not in ("ok", "skipped"), running)

    def close(self) -> None:
        self.bar.close()


class LocalRunner:
    def __init__(self, backend: Backend, configs: list[ReportConfig], first: int = 0):
        self.configs = [dataclasses.asdict(c) for c in configs]
        self.worker = Worker(self.configs[first])  # a bad model or device fails here, before any record
        self.described = self.worker.describe()

    def describe(self) -> dict:
        return self.described

    def calibrate(self) -> dict:
        return self.worker.calibrate()

    def run(self, jobs: list[Job], append: Callable[[dict], None], costs: dict[str, float]) -> dict:
        progress = Progress(costs, "kvcompress report")
        try:
            for index, cell in jobs:
                record = self.worker.run(self.configs[index], cell)
                append(record)
                progress.done(record, "local", self.described["device"], 1)
        finally:
            progress.close()
        return dict(progress.per_worker)

    def close(self) -> None:
        self.worker = None


class WorkerLoadError(ValueError):
    """A worker could not start (its model does not load, say): the same on every worker, so the run stops."""


def _cause(err: BaseException) -> str:
    """The last line of a Ray error that names the exception ('ValueError: unknown model ...'), not its traceback."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    named = [
        line
        for line in lines
        if ": " in line
        and line.split(":", 1)[0].replace(".", "").isidentifier()
        and not line.startswith(("class_name", "actor_id", "pid", "name", "namespace", "ip"))
    ]
    return (named or lines or [type(err).__name__])[-1][:500]


def connect(backend: Backend, device: str):
    """Ray, joined or started here (then `started` is True: whoever connects stops it), and the GPUs each worker
    holds."""
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install 'kvcompress[ray]' (or pip install ray)") from None
    if device.startswith("cuda:"):
        raise ValueError(f"device {device!r}: on --backend ray give --device cuda; Ray hands each worker its GPU")
    started = not ray.is_initialized()
    if started:
        ray.init(address=backend.address, include_dashboard=False, log_to_driver=False)
    return ray, started, backend.gpus_per_worker if backend.gpus_per_worker is not None else float(device == "cuda")


def _fits(ray, backend: Backend, gpus: float) -> int:
    """Workers the cluster holds now, or an error when not one fits (Ray would otherwise wait for it forever)."""
    resources = ray.cluster_resources()
    fits = min(
        resources.get("CPU", 0) // backend.cpus_per_worker, resources.get("GPU", 0) // gpus if gpus else math.inf
    )
    if fits < 1:
        raise ValueError(
            f"the Ray cluster has {resources.get('CPU', 0):g} CPUs and {resources.get('GPU', 0):g} "
            f"GPUs: not one worker of {backend.cpus_per_worker:g} CPUs and {gpus:g} GPUs "
            f"fits (--cpus-per-worker, --gpus-per-worker)"
        )
    return int(fits)


def _threaded(threads: int, function: Callable, *args):
    torch.set_num_threads(threads)
    return function(*args)


class RayTasks:
    """Functions run as Ray tasks in one Ray session (joined, or started here and stopped on leaving the `with`),
    each task holding a worker's CPUs and GPUs. Ctrl-C cancels the tasks left."""

    def __init__(self, backend: Backend, device: str):
        self.ray, self.started, gpus = connect(backend, device)
        self.threads = backend.threads
        try:
            self.workers = _fits(self.ray, backend, gpus)
        except BaseException:
            self.close()
            raise
        self.task = self.ray.remote(_threaded).options(
            num_cpus=backend.cpus_per_worker, num_gpus=gpus, max_retries=backend.retries
        )

    def __enter__(self) -> RayTasks:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def map(self, function: Callable, calls: list[tuple], finished: Callable[[int], None] | None = None) -> list:
        """function(*args) for each of `calls`, all at once; results in order. `finished(i)` as call i ends."""
        ray = self.ray
        refs = [self.task.remote(self.threads, function, *args) for args in calls]
        try:
            pending = list(refs)
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done[0])  # a failed task raises here, as it ends
                if finished:
                    finished(refs.index(done[0]))
            return ray.get(refs)
        except ray.exceptions.RayTaskError as err:
            raise err.as_instanceof_cause() from None
        except KeyboardInterrupt:  # the unfinished tasks are interrupted (not force-killed: Ray 2.60's driver can
            # abort on a forced cancel racing a task's completion), then Ray stops if this run started it
            for ref in ray.wait(refs, num_returns=len(refs), timeout=0)[1]:
                ray.cancel(ref)
            raise

    def close(self) -> None:
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


class RayRunner:
    def __init__(self, backend: Backend, configs: list[ReportConfig], first: int = 0):
        self.actors: dict[str, object] = {}
        self.ray, self.started, self.gpus = connect(backend, configs[0].device)
        self.backend, self.configs = backend, [dataclasses.asdict(c) for c in configs]
        self.first_config = self.configs[first]  # workers load the model of the first cell left
        self.count, self.run_id = 0, uuid.uuid4().hex[:8]
        try:
            fits = _fits(self.ray, backend, self.gpus)
            self.size = backend.workers or fits
            if self.size > fits:
                print(
                    f"kvcompress: {self.size} workers asked, the cluster holds {int(fits)} now; the others start "
                    f"when resources appear",
                    file=sys.stderr,
                )
            self.actor_class = self.ray.remote(Worker)
            self.ready: dict = {}  # describe() call -> worker, until the worker has loaded its model
            self.where: dict[str, str] = {}
            for _ in range(self.size):
                self._spawn()
            self.described = self._wait_ready(block=True)
        except BaseException:
            self.close()
            raise

    def _spawn(self) -> None:
        name = f"worker-{self.count}"
        self.count += 1
        # named per run, so two sweeps on one cluster never ask for the same actor name
        actor = self.actor_class.options(
            name=f"kvcompress-{self.run_id}-{name}",
            num_cpus=self.backend.cpus_per_worker,
            num_gpus=self.gpus,
            max_restarts=0,
        ).remote(self.first_config, self.backend.threads)
        self.actors[name] = actor
        self.ready[actor.describe.remote()] = name

    def _wait_ready(self, block: bool) -> dict | None:
        """Workers whose model has loaded join the pool; one that could not load it stops the run, clearly."""
        described = None
        while self.ready:
            done, _ = self.ray.wait(list(self.ready), num_returns=1, timeout=None if block else 0)
            if not done:
                break
            name = self.ready.pop(done[0])
            try:
                described = self.ray.get(done[0])
            except self.ray.exceptions.RayError as err:
                raise WorkerLoadError(
                    f"Ray worker {name} could not start (model {self.first_config['model']!r}): {_cause(err)}"
                ) from None
            self.where[name] = f"{described['host']}, {described['device']}"
            block = False
        return described

    def describe(self) -> dict:
        return {**self.described, "workers": self.size}

    def calibrate(self) -> dict:
        """Timed on one worker that has loaded its model (the others may still be loading theirs)."""
        name = next(n for n in self.where if n in self.actors)
        return self.ray.get(self.actors[name].calibrate.remote())

    def run(self, jobs: list[Job], append: Callable[[dict], None], costs: dict[str, float]) -> dict:
        ray = self.ray
        self.queue = collections.deque(units(jobs, self.configs))
        self.attempts: collections.Counter = collections.Counter()  # cell id -> reruns after its worker died
        self.inflight: dict = {}  # result ref -> (worker, job), in the order each worker runs them
        self.append, self.progress = append, Progress(costs, f"kvcompress on Ray ({self.size} workers)")
        try:
            while self.queue or self.inflight:
                self._wait_ready(block=False)
                busy = {worker for worker, _ in self.inflight.values()}
                for name in [n for n in self.where if n in self.actors and n not in busy]:
                    if self.queue:
                        for job in self.queue.popleft():
                            self.inflight[self.actors[name].run.remote(self.configs[job[0]], job[1])] = (name, job)
                if not self.inflight:  # work is queued but no worker has loaded its model yet
                    if not self.ready:
                        raise RuntimeError("no Ray worker is alive or starting, and cells are left: resume the run")
                    self._wait_ready(block=True)
                    continue
                done, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
                for ref in done:
                    if ref not in self.inflight:
                        continue  # a dead worker's call, already handed back
                    name, (_, cell) = self.inflight[ref]
                    try:
                        record = ray.get(ref)
                    except ray.exceptions.RayActorError as err:  # the worker died: its cells go to another
                        self._worker_died(name, err)
                        continue
                    except ray.exceptions.RayTaskError as err:
                        raise err.as_instanceof_cause() from None
                    del self.inflight[ref]
                    self._done(
                        {**record, **({"attempt": self.attempts[cell["id"]] + 1} if self.attempts[cell["id"]] else {})},
                        name,
                    )
        finally:
            self.progress.close()
        return dict(self.progress.per_worker)

    def _done(self, record: dict, name: str) -> None:
        self.append({**record, "worker": name})
        self.progress.done(record, name, self.where.get(name, "?"), len({n for n, _ in self.inflight.values()}))

    def _worker_died(self, name: str, err) -> None:
        lost = [(ref, job) for ref, (worker, job) in self.inflight.items() if worker == name]
        for ref, _ in lost:
            del self.inflight[ref]
        del self.actors[name]
        reason = _cause(err)
        # Ray's memory monitor kills the worker whose host runs low on memory: the cell it ran is an outcome
        out_of_memory = isinstance(err, self.ray.exceptions.OutOfMemoryError) or "low on memory" in str(err)
        retry = []
        for position, (_, (index, cell)) in enumerate(lost):
            if out_of_memory and position == 0:  # a worker runs its cells in order: the first was running
                self._done({**cell, "outcome": "allocation_failure", "error": f"{name} killed: {reason}"}, name)
            elif self.attempts[cell["id"]] >= self.backend.retries:
                self._done(
                    {
                        **cell,
                        "outcome": "error",
                        "error": f"its worker died {self.attempts[cell['id']] + 1} times: {reason}",
                    },
                    name,
                )
            else:
                self.attempts[cell["id"]] += 1
                retry.append((index, cell))
        if retry:
            self.queue.appendleft(retry)
        if self.queue:
            print(f"kvcompress: {name} died ({reason}); {len(retry)} cells go to another worker", file=sys.stderr)
            self._spawn()

    def close(self) -> None:
        for actor in getattr(self, "actors", {}).values():
            try:
                self.ray.kill(actor)
            except Exception:  # noqa: BLE001  (already gone)
                pass
        self.actors = {}
        if self.started and self.ray.is_initialized():
            self.ray.shutdown()


def start(backend: Backend, configs: list[ReportConfig], first: int = 0) -> LocalRunner | RayRunner:
    """The runner of `backend`, its workers loading the model of configs[first] (the first cell left)."""
    return (RayRunner if backend.name == "ray" else LocalRunner)(backend, configs, first)
