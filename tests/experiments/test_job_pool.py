"""The seed study's worker pool: reuse of workers, crashes, stale rows."""

import json

import ml_collections

from experiments import seed_study


def test_a_dying_worker_fails_its_job_only_and_is_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(seed_study, "WORKER_MODULE", "tests.experiments.fake_study_worker")
    (tmp_path / "rows").mkdir()
    # A row left by an earlier invocation must not pass for this one's.
    stale = seed_study.row_path(tmp_path, ("ok", "c"))
    stale.write_text(json.dumps({"name": "stale"}))
    jobs = [("ok", "a"), ("die", "b"), ("ok", "c"), ("ok", "d"), ("ok", "e")]
    cfg = ml_collections.ConfigDict(dict(parallel_runs=2))
    with seed_study.JobPool(cfg, tmp_path) as pool:
        rows = pool.run(jobs, desc="test")
        again = pool.run([("ok", "f")], desc="test")

    assert set(rows) == set(jobs)
    assert rows[("die", "b")]["error"] == "worker exited with code 3"
    assert "dying on b" in rows[("die", "b")]["traceback"]
    ok = [rows[job] for job in jobs if job[0] == "ok"] + [again[("ok", "f")]]
    assert [row["name"] for row in ok] == ["a", "c", "d", "e", "f"]
    # Workers serve several jobs: two at the start and one replacing the dead one.
    assert len({row["pid"] for row in ok}) <= 3
    assert len(list((tmp_path / "rows").glob("worker-*.log"))) == 3


def test_one_run_at_a_time_runs_in_this_process(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(
        seed_study, "do_job", lambda cfg, job, root: calls.append(job) or {"job": list(job)}
    )
    cfg = ml_collections.ConfigDict(dict(parallel_runs=1))
    with seed_study.JobPool(cfg, tmp_path) as pool:
        rows = pool.run([("a", "1"), ("b", "2")], desc="test")
    assert calls == [("a", "1"), ("b", "2")]
    assert rows[("b", "2")] == {"job": ["b", "2"]}
    assert not list((tmp_path / "rows").glob("worker-*.log"))
