"""The worker pool that summarises a batch's sites: every task runs, errors come back in list order."""

import threading
import time

import pytest

from omct.core.parallel import run_all, worker_count


def test_run_all_runs_every_task_and_raises_the_first_failure_in_list_order(monkeypatch):
    monkeypatch.setenv("OMCT_NUM_THREADS", "2")
    done, threads = [], set()

    def task(i):
        def run():
            time.sleep(0.02 if i == 1 else 0.0)  # the first failure in list order finishes last
            threads.add(threading.get_ident())
            done.append(i)
            if i in (1, 3):
                raise ValueError(f"task {i}")
        return run

    with pytest.raises(ValueError, match="task 1"):
        run_all([task(i) for i in range(6)], costs=[1, 1, 5, 9, 1, 1])
    assert sorted(done) == list(range(6))
    assert threading.get_ident() not in threads  # ran on the pool, not inline


def test_one_worker_runs_inline_and_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("OMCT_NUM_THREADS", "1")
    seen = []
    run_all([lambda: seen.append(threading.get_ident()) for _ in range(3)])
    assert seen == [threading.get_ident()] * 3
    monkeypatch.setenv("OMCT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMCT_NUM_THREADS"):
        worker_count()
