"""The job pool: failures stay in their job, dead workers are replaced, rows are JSON."""

import os

from experiments.study.pool import JobPool, job_log
from tests.experiments import pool_jobs


def test_failures_stay_in_their_job_and_a_dead_worker_is_replaced(tmp_path):
    jobs = [("ok", "a"), ("die", "b"), ("ok", "c"), ("raise", "d"), ("ok", "e"), ("numpy", "f")]
    with JobPool(pool_jobs.work, workers=2, log_dir=tmp_path, setup=pool_jobs.setup) as pool:
        rows = pool.run(jobs, desc="test")
        again = pool.run([("ok", "g")], desc="test")

    assert set(rows) == set(jobs)
    died = rows[("die", "b")]
    assert died["error"].startswith("the worker process died during the job")
    assert "dying on b" in died["traceback"]
    assert rows[("raise", "d")]["error"] == "ValueError: job d is bad"
    assert "pool_jobs.py" in rows[("raise", "d")]["traceback"]
    assert rows[("numpy", "f")] == {"value": 0.5}
    ok = [rows[job] for job in jobs if job[0] == "ok"] + [again[("ok", "g")]]
    assert [row["name"] for row in ok] == ["a", "c", "e", "g"]
    # Jobs ran in other processes, and workers serve several jobs: two at the
    # start and one in place of the dead one.
    pids = {row["pid"] for row in ok}
    assert os.getpid() not in pids and len(pids) <= 3
    logs = sorted(p.name for p in tmp_path.glob("worker-*.log"))
    assert logs == ["worker-0.log", "worker-1.log", "worker-2.log"]
    # Each worker's own output (its setup) goes to its log, a job's to the job's.
    assert all("set up" in (tmp_path / name).read_text() for name in logs)
    assert job_log(tmp_path, ("die", "b")).read_text() == "dying on b\n"


def test_a_stale_log_is_not_taken_for_the_jobs(tmp_path):
    job_log(tmp_path, ("ok", "a")).write_text("from an earlier run\n")
    with JobPool(pool_jobs.work, workers=2, log_dir=tmp_path) as pool:
        rows = pool.run([("ok", "a")], desc="test")
    assert rows[("ok", "a")]["name"] == "a"
    assert job_log(tmp_path, ("ok", "a")).read_text() == ""


def test_one_worker_runs_the_jobs_in_this_process_with_the_same_rows(tmp_path):
    jobs = [("ok", "a"), ("raise", "b"), ("numpy", "c")]
    with JobPool(pool_jobs.work, workers=1, log_dir=tmp_path) as pool:
        rows = pool.run(jobs, desc="test")
    assert list(rows) == jobs
    assert rows[("ok", "a")] == {"name": "a", "pid": os.getpid()}
    assert rows[("raise", "b")]["error"] == "ValueError: job b is bad"
    assert rows[("numpy", "c")] == {"value": 0.5}
    assert not list(tmp_path.glob("*.log"))


def test_progress_counts_what_the_caller_says(tmp_path):
    seen = []

    def progress() -> int:
        seen.append(len(seen))
        return 7

    with JobPool(pool_jobs.work, workers=1, log_dir=tmp_path) as pool:
        pool.run([("ok", "a"), ("ok", "b")], desc="test", total=7, progress=progress, unit="step")
    assert len(seen) == 3  # after each job and once at the end
