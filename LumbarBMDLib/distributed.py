"""Batches on Dask (``lumbarbmd run ... --scheduler local[:N] | tcp://host:port``; needs ``dask.distributed``, the
``archive`` extra).

The client (the ``lumbarbmd run`` process) submits one task per input; each task runs on a worker the same
:func:`LumbarBMDLib.batch._run_one` as the in-process batch: the case lock, the atomic case folder, the case-id
resolution and the resume check happen on the worker, in the shared output folder. The client writes
``summary.csv`` after every completed task (as the in-process batch does after every case), shows the progress
bar as the tasks complete, and returns the outcomes in input order.

- **Models once per worker.** A worker process loads the two models at its first case (or when the batch starts,
  :func:`warm_worker`) and keeps them in :data:`_MODELS`, keyed by the model files (path, size, mtime), the device
  and ``allow_unverified``; a long-lived cluster serves later batches with the same models without reloading.
- **Threads.** ``local:N`` starts N worker *processes* (one case at a time each: a case needs about 1.4 GB); each
  sets torch's and ITK's threads to ``max(1, cores // N)`` (``threads_per_worker`` overrides), so workers × threads
  never exceed the cores. ``local`` alone: N = the cores, bounded by the memory (3 GiB per worker). On an existing
  cluster each worker uses its host's cores divided by the task slots of that host's workers.
- **Lost workers.** A case whose worker dies (killed, out of memory) is run again on another worker by the
  scheduler (up to ``distributed.scheduler.allowed-failures``, 3 by default); a task that raises is retried
  ``retries`` times. The case lock and the atomic folder make a re-run safe: the case is either complete in its
  folder (the re-run finds it done) or absent (a temporary folder of the dead worker, removed at the end of the
  batch or by the next run). A case that keeps killing its workers is reported failed with a sentence.
- **Paths.** Inputs and the output folder are sent as absolute paths (the workers do not share the client's working
  directory); on a cluster past one machine they must be on a file system every worker sees at the same path, as
  must models given with ``--seg-model`` / ``--bmd-model`` (the default models are each worker's installed ones).
"""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from LumbarBMDLib.batch import (
    CaseOutcome,
    _run_one,
    failed_results,
    in_case_folder,
    write_case_outputs,
    write_summary,
)
from LumbarBMDLib.durable import clean_stale_temporaries
from LumbarBMDLib.errors import LumbarBMDError

INSTALL_HINT = 'pip install "lumbarbmd[archive]"'
#: Environment variables of the client that the workers must see too (read by the library per case).
FORWARDED_ENV = ("LUMBARBMD_MAX_VOXELS", "LUMBARBMD_ALLOW_UNVERIFIED_MODELS", "LUMBARBMD_MODELS")
DEFAULT_RETRIES = 2  # a task that raises is tried again twice (a worker that dies: allowed-failures)
GIB_PER_WORKER = 3  # ``local``: at most one worker per 3 GiB of memory (a full case peaks at about 1.4 GB)


def import_distributed():
    """``dask.distributed``, or a sentence saying how to install it."""
    try:
        import distributed
    except ImportError:
        raise LumbarBMDError("--scheduler runs the batch on Dask, which is not installed here: "
                             f'{INSTALL_HINT} (or run without --scheduler, in this process)') from None
    return distributed


def available_cores() -> int:
    """The CPU cores this process may use (its affinity mask where the system has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def total_memory_gib() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return None


def parse_local(scheduler: str) -> int | None:
    """``local`` → None (choose), ``local:N`` → N; anything else is not a local cluster (ValueError)."""
    if scheduler == "local":
        return None
    head, _, count = scheduler.partition(":")
    if head != "local" or not count.isdigit() or int(count) < 1:
        raise ValueError(scheduler)
    return int(count)


def check_scheduler(scheduler: str) -> str:
    """A ``--scheduler`` value checked: ``local``, ``local:N`` (N ≥ 1) or an address with a scheme
    (``tcp://host:port``, ``tls://…``); anything else is a sentence."""
    try:
        parse_local(scheduler)
        return scheduler
    except ValueError:
        pass
    if scheduler.startswith("local"):
        raise LumbarBMDError(f"--scheduler {scheduler}: write local (one worker per core) or local:N with N a "
                             "positive number of workers")
    if "://" not in scheduler:
        raise LumbarBMDError(f"--scheduler {scheduler} is neither local[:N] nor a scheduler address such as "
                             "tcp://host:8786")
    return scheduler


def local_layout(workers: int | None, threads_per_worker: int | None = None) -> tuple[int, int]:
    """(worker processes, torch/ITK threads per worker) of a local cluster on this machine: workers × threads ≤ the
    cores (``workers`` None: the cores, bounded by the memory at :data:`GIB_PER_WORKER` each)."""
    cores = available_cores()
    if workers is None:
        memory = total_memory_gib()
        workers = max(1, min(cores, int(memory // GIB_PER_WORKER) if memory else cores))
    threads = threads_per_worker or max(1, cores // workers)
    return workers, threads


@dataclass(frozen=True)
class ModelSpec:
    """Which models a worker loads: paths (None: the worker's shipped model), device, ``allow_unverified``."""

    seg_path: str | None
    bmd_path: str | None
    device: str
    allow_unverified: bool

    @classmethod
    def of(cls, seg_path, bmd_path, device: str, allow_unverified: bool) -> ModelSpec:
        absolute = lambda p: os.path.abspath(Path(p).expanduser()) if p else None  # noqa: E731
        return cls(absolute(seg_path), absolute(bmd_path), device, bool(allow_unverified))


# ---------------------------------------------------------------------------------------------------------------
# worker side
# ---------------------------------------------------------------------------------------------------------------
_MODELS: dict[tuple, tuple] = {}  # per worker process: model key -> (SegmentationModel, RegressionModel)
_MODELS_LOCK = threading.Lock()
MODEL_LOADS = {"count": 0}  # how many times this process loaded models (the tests read it on the workers)


def _file_key(path: Path) -> tuple:
    try:
        st = path.stat()
        return str(path), st.st_size, st.st_mtime_ns
    except OSError:
        return str(path), None, None  # the loader says why it cannot be read


def worker_models(spec: ModelSpec):
    """The models of ``spec``, loaded once per worker process (the files' size and mtime in the key: a model
    replaced on disk is loaded again)."""
    from LumbarBMDLib.regression import RegressionModel
    from LumbarBMDLib.segmentation import SegmentationModel, models_dir

    seg = Path(spec.seg_path) if spec.seg_path else models_dir() / "segmentation.safetensors"
    bmd = Path(spec.bmd_path) if spec.bmd_path else models_dir() / "regression.safetensors"
    key = (_file_key(seg), _file_key(bmd), spec.device, spec.allow_unverified)
    with _MODELS_LOCK:
        if key not in _MODELS:
            _MODELS[key] = (SegmentationModel.load(seg, device=spec.device, allow_unverified=spec.allow_unverified),
                            RegressionModel.load(bmd, device=spec.device, allow_unverified=spec.allow_unverified))
            MODEL_LOADS["count"] += 1
        return _MODELS[key]


def _apply_env(env: dict[str, str | None]) -> None:
    for name, value in env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def _set_threads(threads: dict[str, int] | int | None, address: str | None = None) -> None:
    """torch's and ITK's threads in this worker: an int, or per host (``{host: threads}``; ``address``: this
    worker's, default the one running the current task)."""
    if isinstance(threads, dict):
        if address is None:
            from distributed import get_worker

            address = get_worker().address
        threads = threads.get(address.rsplit(":", 1)[0])
    if not threads:
        return
    import SimpleITK as sitk
    import torch

    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def warm_worker(spec: ModelSpec, env: dict[str, str | None], threads, dask_worker=None) -> int:
    """Run on every worker when a batch starts (``Client.run``, which passes ``dask_worker``): load the models (a
    bad model is one sentence before any case); returns this process's model loads so far."""
    _apply_env(env)
    _set_threads(threads, dask_worker.address if dask_worker is not None else None)
    worker_models(spec)
    return MODEL_LOADS["count"]


def model_loads() -> int:
    """This worker process's model loads so far."""
    return MODEL_LOADS["count"]


def case_task(path: str, case_id: str, out_dir: str, spec: ModelSpec, options: dict, env: dict[str, str | None],
              threads) -> CaseOutcome:
    """One case on a worker: the in-process batch's :func:`~LumbarBMDLib.batch._run_one` with this worker's models."""
    _apply_env(env)
    _set_threads(threads)
    seg_model, bmd_model = worker_models(spec)
    return _run_one(Path(path), case_id, Path(out_dir), seg_model, bmd_model, **options)


# ---------------------------------------------------------------------------------------------------------------
# client side
# ---------------------------------------------------------------------------------------------------------------
#: Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536`` (to hand freed memory back to the system).
#: Setting it turns off glibc's dynamic mmap threshold, so every tensor above 128 kB is mmap'ed, zero-filled and
#: unmapped again: the R2U-Net's segmentation took 4.7–6.5 s on a worker against 1.8–2.3 s in a process with the same
#: one thread (measured on the full phantom, 2026-12-01). LumbarBMD's local workers start without it.
WORKER_ENVIRON_DROPPED = ("MALLOC_TRIM_THRESHOLD_",)


def worker_environ() -> dict:
    """Dask's ``distributed.nanny.pre-spawn-environ`` without :data:`WORKER_ENVIRON_DROPPED` (the thread limits
    stay: each worker sets its own torch/ITK threads)."""
    import dask

    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", default={}) or {})
    return {k: v for k, v in environ.items() if k not in WORKER_ENVIRON_DROPPED}


@contextlib.contextmanager
def connect(scheduler: str, threads_per_worker: int | None = None):
    """A ``distributed.Client`` on a new local cluster (``local[:N]``, closed at the end) or on the scheduler at an
    address; yields ``(client, threads)`` where ``threads`` is what each worker gives torch and ITK."""
    distributed = import_distributed()
    import logging

    scheduler = check_scheduler(scheduler)
    try:
        count = parse_local(scheduler)
        local = True
    except ValueError:
        local = False
    if local:
        workers, threads = local_layout(count, threads_per_worker)
        import dask

        for name in WORKER_ENVIRON_DROPPED:  # a nanny of an earlier cluster in this process left it in os.environ,
            os.environ.pop(name, None)  # which new workers would inherit (Nanny copies pre-spawn-environ there)

        with dask.config.set({"distributed.nanny.pre-spawn-environ": worker_environ()}), \
                distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                         dashboard_address=None, scheduler_port=0,
                                         silence_logs=logging.ERROR) as cluster, distributed.Client(cluster) as client:
            yield client, threads
        return
    try:
        client = distributed.Client(scheduler, timeout="30s")
    except (OSError, TimeoutError) as err:
        raise LumbarBMDError(f"cannot reach the Dask scheduler at {scheduler}: {err}") from None
    with client:
        if threads_per_worker:
            yield client, threads_per_worker
            return
        try:
            workers = client.scheduler_info(n_workers=-1)["workers"]
        except TypeError:  # dask.distributed before 2025 lists every worker anyway
            workers = client.scheduler_info()["workers"]
        slots: dict[str, int] = {}
        for address, info in workers.items():
            host = address.rsplit(":", 1)[0]
            slots[host] = slots.get(host, 0) + int(info.get("nthreads", 1))
        cores = client.run(available_cores)  # per worker; workers of one host report the same
        per_host = {}
        for address, n in cores.items():
            host = address.rsplit(":", 1)[0]
            per_host[host] = max(1, n // max(1, slots.get(host, 1)))
        yield client, per_host


def allowed_failures() -> int:
    """How many times the scheduler re-runs a task whose worker died (``distributed.scheduler.allowed-failures``)."""
    import dask

    return int(dask.config.get("distributed.scheduler.allowed-failures", 3))


def _forwarded_env() -> dict[str, str | None]:
    return {name: os.environ.get(name) for name in FORWARDED_ENV}


def _lost_case(out_dir: Path, path: Path, case_id: str, sentence: str) -> CaseOutcome:
    """A case whose task never finished (its workers kept dying): a failed results.json, written as the in-process
    batch writes a failed case (unless the folder holds another input, or this case finished after all)."""
    def record_failure(folder: Path, identity: dict) -> dict:
        results = {**failed_results(str(path), sentence), **identity}
        with contextlib.suppress(OSError):
            write_case_outputs(folder, results, None)
        return results

    return in_case_folder(path, case_id, out_dir, record_failure)


def run_distributed(scheduler: str, jobs: list[tuple[Path, str]], out_dir: Path, spec: ModelSpec, options: dict, *,
                    progress: bool = True, threads_per_worker: int | None = None,
                    retries: int | None = None) -> list[CaseOutcome]:
    """The batch of ``jobs`` (``(absolute input path, case id)``) on Dask; outcomes in input order. ``options``: the
    keywords of :func:`~LumbarBMDLib.batch._run_one` (calibration, force, scanner_spec, …)."""
    from tqdm import tqdm

    distributed = import_distributed()
    out_dir = Path(os.path.abspath(out_dir))
    retries = DEFAULT_RETRIES if retries is None else retries
    env = _forwarded_env()
    outcomes: list[CaseOutcome | None] = [None] * len(jobs)
    notes: dict[str, str] = {}
    summary_cache: dict[str, tuple[int, dict]] = {}
    with connect(scheduler, threads_per_worker) as (client, threads):
        client.run(warm_worker, spec, env, threads)  # every worker loads the models now, in parallel (a bad model:
        # its sentence, before any case)
        futures = {}
        for i, (path, case_id) in enumerate(jobs):
            future = client.submit(case_task, str(path), case_id, str(out_dir), spec, options, env, threads,
                                   key=f"lumbarbmd-case-{i}-{case_id}", pure=False, retries=retries)
            futures[future] = i
        with tqdm(total=len(jobs), desc="cases", unit="case", disable=not progress) as bar:
            for future in distributed.as_completed(futures):
                i = futures[future]
                path, case_id = jobs[i]
                try:
                    outcome = future.result()
                except distributed.KilledWorker:
                    tries = allowed_failures() + 1
                    outcome = _lost_case(out_dir, path, case_id, "the case was lost: every worker that ran it died "
                                         f"({tries} {'try' if tries == 1 else 'tries'}; out of memory, or killed)")
                if outcome.note:
                    notes[outcome.case] = outcome.note
                outcomes[i] = outcome
                write_summary(out_dir, notes, summary_cache)  # after every completed case, as in-process
                bar.update(1)
    clean_stale_temporaries(out_dir)  # the temporary folders of workers that died during this batch
    return [o for o in outcomes if o is not None]
