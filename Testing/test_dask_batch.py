"""Issue 16: batches on Dask (``lumbarbmd run --scheduler``) on a real LocalCluster of worker processes, with the
shipped models and small phantom CTs: the same results and summary as the in-process batch, a damaged input
reported while the batch goes on, resume, models loaded once per worker, a worker killed mid-case, and a
``lumbarbmd run --scheduler local:2`` killed mid-batch and run again."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import distributed
import pytest

from LumbarBMDLib.batch import run_batch
from LumbarBMDLib.durable import LOCK_FOLDER
from LumbarBMDLib.phantom import generate_case
from LumbarBMDLib.volume import write_volume

SEEDS = (3101, 3102, 3103)
CASES = [f"p{seed}" for seed in SEEDS]
VOLATILE = {"timings_s", "seconds", "total_s"}  # how long things took: the only fields that may differ


def stable(obj):
    """A results.json object without its timings."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VOLATILE}
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def summary(out: Path) -> list[dict]:
    return [stable(r) for r in csv.DictReader((out / "summary.csv").open(encoding="utf-8"))]


def results(out: Path, case: str) -> dict:
    return json.loads((out / case / "results.json").read_text(encoding="utf-8"))


def leftovers(out: Path) -> list[str]:
    """Hidden entries of an output folder other than the lock folder (temporary folders or files)."""
    return sorted(p.name for p in out.iterdir() if p.name.startswith(".") and p.name != LOCK_FOLDER)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dask-cohort")
    inputs = []
    for seed, case in zip(SEEDS, CASES):
        inputs.append(write_volume(generate_case(seed, "A", "small").ct, root / "in" / case / "ct.nii.gz"))
    damaged = root / "in" / "damaged" / "ct.nii.gz"
    damaged.parent.mkdir(parents=True)
    data = inputs[0].read_bytes()
    damaged.write_bytes(data[: len(data) // 2])  # a transfer cut half-way
    inputs.insert(1, damaged)
    reference = root / "in-process"
    outcomes = run_batch(inputs, reference, device="cpu", progress=False)
    return {"root": root, "inputs": inputs, "reference": reference, "outcomes": outcomes}


@pytest.fixture(scope="module")
def cluster():
    """Two worker processes, one task slot each (what ``--scheduler local:2`` starts)."""
    import logging

    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=logging.ERROR) as cl, distributed.Client(cl) as client:
        yield cl.scheduler_address, client


def model_loads(client) -> list[int]:
    from LumbarBMDLib.distributed import model_loads as loads

    return sorted(client.run(loads).values())


@pytest.fixture(scope="module")
def dask_out(cohort, cluster, tmp_path_factory) -> dict:
    """The cohort's batch on the cluster (what the first two tests look at)."""
    address, _ = cluster
    out = tmp_path_factory.mktemp("dask") / "out"
    return {"out": out, "outcomes": run_batch(cohort["inputs"], out, device="cpu", progress=False,
                                              scheduler=address)}


def test_dask_batch_gives_the_in_process_results(cohort, cluster, dask_out):
    _, client = cluster
    out, outcomes = dask_out["out"], dask_out["outcomes"]
    assert [o.case for o in outcomes] == [o.case for o in cohort["outcomes"]] == [CASES[0], "damaged", *CASES[1:]]
    for case in CASES:
        mine, reference = results(out, case), results(cohort["reference"], case)
        assert mine["status"] == "ok" and len([v for v in mine["vertebrae"] if v["found"]]) == 4
        assert stable(mine) == stable(reference)  # every number, flag and sentence; only the seconds differ
    assert summary(out) == summary(cohort["reference"]) and len(summary(out)) == 4
    # the damaged input: reported with its sentence, its folder holds only results.json, the batch went on
    damaged = results(out, "damaged")
    assert damaged["status"] == "failed" and damaged["error"] == results(cohort["reference"], "damaged")["error"]
    assert damaged["error"] and sorted(p.name for p in (out / "damaged").iterdir()) == ["results.json"]
    assert {r["case"]: r["status"] for r in summary(out)}["damaged"] == "failed"
    assert [o.results["status"] for o in outcomes] == ["ok", "failed", "ok", "ok"]
    assert leftovers(out) == []
    assert model_loads(client) == [1, 1]  # once per worker process, not once per case


def test_resume_skips_finished_cases_and_reuses_the_workers_models(cohort, cluster, dask_out):
    address, client = cluster
    out = dask_out["out"]
    before = {case: (out / case / "results.json").read_bytes() for case in CASES}
    again = run_batch(cohort["inputs"], out, device="cpu", progress=False, scheduler=address)
    assert [o.skipped for o in again] == [True, False, True, True]  # a failed case is tried again
    assert [o.results["status"] for o in again] == ["ok", "failed", "ok", "ok"]
    assert {case: (out / case / "results.json").read_bytes() for case in CASES} == before
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*CASES, "damaged",
                                                                                          "summary.csv"])
    assert model_loads(client) == [1, 1]  # a long-lived cluster keeps its models across batches


def test_a_case_whose_worker_is_killed_is_run_again_elsewhere(cohort, cluster, tmp_path):
    address, client = cluster
    out = tmp_path / "lost"
    inputs = [p for p in cohort["inputs"] if "damaged" not in str(p)][:1]
    pids = client.run(os.getpid)
    done: dict = {}
    thread = threading.Thread(target=lambda: done.update(
        outcomes=run_batch(inputs, out, device="cpu", progress=False, scheduler=address)))
    thread.start()
    victim, deadline = None, time.time() + 120
    while victim is None and time.time() < deadline:
        for worker, keys in client.processing().items():
            if any(str(k).startswith("lumbarbmd-case-") for k in keys):
                victim = worker
                break
        time.sleep(0.05)
    assert victim is not None, "no case was seen running"
    os.kill(pids[victim], signal.SIGKILL)  # the worker dies mid-case; its nanny starts a new one
    thread.join(timeout=300)
    assert not thread.is_alive()
    outcomes = done["outcomes"]
    assert [o.case for o in outcomes] == CASES[:1] and outcomes[0].results["status"] == "ok"
    for case in CASES[:1]:
        assert stable(results(out, case)) == stable(results(cohort["reference"], case))
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == sorted([*CASES[:1],
                                                                                          "summary.csv"])
    assert leftovers(out) == []  # the dead worker's temporary folder was removed at the end of the batch
    assert len(client.scheduler_info(n_workers=-1)["workers"]) == 2


def test_a_case_whose_workers_all_die_is_a_failed_case_with_its_sentence_and_the_batch_goes_on(cohort, tmp_path):
    import logging

    import dask

    out = tmp_path / "lost-for-good"
    inputs = [p for p in cohort["inputs"] if "damaged" not in str(p)][:2]
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), \
            distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                     silence_logs=logging.CRITICAL) as cl, distributed.Client(cl) as client:
        pids = client.run(os.getpid)
        done: dict = {}
        thread = threading.Thread(target=lambda: done.update(
            outcomes=run_batch(inputs, out, device="cpu", progress=False, scheduler=cl.scheduler_address,
                               retries=0)))
        thread.start()
        victim, deadline = None, time.time() + 120
        while victim is None and time.time() < deadline:
            for worker, keys in client.processing().items():
                running = [str(k) for k in keys if str(k).startswith("lumbarbmd-case-0-")]
                if running:
                    victim = worker
                    break
            time.sleep(0.05)
        assert victim is not None, "the first case was not seen running"
        os.kill(pids[victim], signal.SIGKILL)  # no retry is allowed: the case is lost
        thread.join(timeout=300)
        assert not thread.is_alive()
    lost, other = done["outcomes"]
    assert lost.case == CASES[0] and lost.results["status"] == "failed"
    assert lost.results["error"] == ("the case was lost: every worker that ran it died (1 try; out of memory, or "
                                     "killed)")
    assert sorted(p.name for p in (out / CASES[0]).iterdir()) == ["results.json"]
    assert results(out, CASES[0])["input_sha256"] and results(out, CASES[0])["status"] == "failed"
    assert other.results["status"] == "ok"  # the batch went on
    assert stable(results(out, CASES[1])) == stable(results(cohort["reference"], CASES[1]))
    rows = {r["case"]: r for r in csv.DictReader((out / "summary.csv").open(encoding="utf-8"))}
    assert rows[CASES[0]]["status"] == "failed" and "lost" in rows[CASES[0]]["error"]
    assert leftovers(out) == []  # the dead worker's temporary folder was removed


def test_a_killed_dask_batch_run_again_loses_no_case_and_computes_none_twice(cohort, cluster, tmp_path):
    address, _ = cluster
    out = tmp_path / "killed"
    inputs = [str(p) for p in cohort["inputs"] if "damaged" not in str(p)]
    cmd = [sys.executable, "-m", "LumbarBMDLib", "run", *inputs, "--out", str(out), "--device", "cpu", "--quiet"]
    proc = subprocess.Popen([*cmd, "--scheduler", "local:2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)  # its own process group: the client, scheduler and workers
    deadline, first = time.time() + 240, None
    while first is None and time.time() < deadline and proc.poll() is None:
        done = [p for p in out.glob("*/results.json") if not p.parent.name.startswith(".")] if out.is_dir() else []
        first = done[0].parent.name if done else None
        time.sleep(0.05)
    assert first is not None, proc.stderr.read().decode()[-2000:] if proc.poll() is not None else "no case finished"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    kept = (out / first / "results.json").read_bytes()
    rerun = subprocess.run([*cmd, "--scheduler", address], capture_output=True, text=True, encoding="utf-8",
                           timeout=600)
    assert rerun.returncode == 0 and "Traceback" not in rerun.stderr, rerun.stderr[-2000:]
    line = next(x for x in rerun.stdout.splitlines() if x.startswith(f"{first}: "))
    assert line.startswith(f"{first}: ok") and line.endswith("[already done]")
    names = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
    assert names == sorted([*CASES, "summary.csv"])  # every case once: no p3101_1a2b3c4d beside p3101
    assert (out / first / "results.json").read_bytes() == kept  # the case done before the kill was not redone
    assert sorted(r["case"] for r in summary(out)) == CASES
    for case in CASES:
        assert stable(results(out, case)) == stable(results(cohort["reference"], case))
    assert leftovers(out) == []  # no temporary folder or summary file of the killed run


def test_scheduler_options_are_checked_and_a_missing_dask_is_one_sentence(cohort, tmp_path):
    src = str(cohort["inputs"][0])
    without_dask = ("import sys; sys.modules['distributed'] = None; from LumbarBMDLib.cli import main; "
                    f"sys.exit(main(['run', {src!r}, '--out', {str(tmp_path / 'o')!r}, '--scheduler', 'local:2']))")
    proc = subprocess.run([sys.executable, "-c", without_dask], capture_output=True, text=True, encoding="utf-8",
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert 'pip install "lumbarbmd[archive]"' in proc.stderr and proc.stderr.startswith("lumbarbmd: error: ")
    assert not (tmp_path / "o" / "p3101").exists()  # nothing was computed
    for bad, said in (("local:0", "local:N with N a positive number"), ("somehost:8786", "neither local[:N]")):
        proc = subprocess.run([sys.executable, "-m", "LumbarBMDLib", "run", src, "--out", str(tmp_path / "o"),
                               "--scheduler", bad], capture_output=True, text=True, encoding="utf-8",
                              timeout=120)
        assert proc.returncode == 1 and said in proc.stderr, proc.stderr
    proc = subprocess.run([sys.executable, "-m", "LumbarBMDLib", "run", src, "--out", str(tmp_path / "o"),
                           "--threads-per-worker", "2"], capture_output=True, text=True, encoding="utf-8",
                          timeout=120)
    assert proc.returncode == 2 and "--threads-per-worker needs --scheduler" in proc.stderr


def test_local_layout_never_oversubscribes_the_cores():
    from LumbarBMDLib.distributed import available_cores, local_layout

    cores = available_cores()
    for workers in (1, 2, cores, 2 * cores):
        n, threads = local_layout(workers)
        assert n == workers and threads >= 1 and (n * threads <= cores or threads == 1)
    n, threads = local_layout(None)
    assert 1 <= n <= cores and n * threads <= cores


def test_local_workers_start_without_dasks_malloc_trim_threshold():
    """Dask's default MALLOC_TRIM_THRESHOLD_ turns off glibc's dynamic mmap threshold (the segmentation ran 2.5×
    slower on a worker): the local cluster's workers must not inherit it; the thread limits stay."""
    from LumbarBMDLib.distributed import connect

    with connect("local:1") as (client, _threads):
        trim = client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_")
        omp = client.run(os.environ.get, "OMP_NUM_THREADS")
    assert list(trim.values()) == [None]
    assert list(omp.values()) == ["1"]
