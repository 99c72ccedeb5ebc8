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
    assert len(threads) <= 2  # the caller and one pool thread (issue 17 item 7: no third thread's malloc arena)


def test_caller_takes_tasks_beside_one_fewer_pool_thread_and_nested_calls_finish(monkeypatch):
    monkeypatch.setenv("OMCT_NUM_THREADS", "2")
    meeting, seen = threading.Barrier(2, timeout=10), []

    def meet():
        meeting.wait()  # passes only when two threads run these at once
        seen.append(threading.get_ident())

    run_all([meet, meet])
    assert len(set(seen)) == 2 and threading.get_ident() in seen
    inner = []

    def outer():  # the pool's one thread busy here: its queued share of the inner call is dropped, not awaited
        run_all([lambda: inner.append(1)] * 3)

    run_all([outer, outer])
    assert len(inner) == 6


def test_one_worker_runs_inline_and_bad_setting_is_named(monkeypatch):
    monkeypatch.setenv("OMCT_NUM_THREADS", "1")
    seen = []
    run_all([lambda: seen.append(threading.get_ident()) for _ in range(3)])
    assert seen == [threading.get_ident()] * 3
    monkeypatch.setenv("OMCT_NUM_THREADS", "many")
    with pytest.raises(ValueError, match="OMCT_NUM_THREADS"):
        worker_count()


def _blas_threads() -> list[int]:
    import threadpoolctl

    return [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]


def test_calibration_statistics_and_records_run_with_one_blas_thread(tmp_path, monkeypatch):
    """During each batch's statistics and the records at the last batch numpy's BLAS has one thread (OpenBLAS's
    spinning threads slowed every other pool on 2 cores), and the user's setting is back after each batch."""
    import numpy as np
    import threadpoolctl
    from onnx_builders import conv_model

    import omct.onnx as amct
    from omct.algorithms.statistics import Statistics
    from omct.quantize import Calibration

    rng = np.random.default_rng(0)
    model = tmp_path / "m.onnx"
    import onnx

    onnx.save(conv_model(rng), model)
    seen = {"observe": [], "finish": []}
    observe, finish = Statistics.observe, Calibration.finish

    def observing(self, *a, **k):
        seen["observe"].append(_blas_threads())
        return observe(self, *a, **k)

    def finishing(self):
        seen["finish"].append(_blas_threads())
        return finish(self)

    monkeypatch.setattr(Statistics, "observe", observing)
    monkeypatch.setattr(Calibration, "finish", finishing)
    cfg, mod, rec = tmp_path / "c.json", tmp_path / "mod.onnx", tmp_path / "r.txt"
    with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
        amct.create_quant_config(str(cfg), str(model), batch_num=2)
        amct.quantize_model(str(cfg), str(model), str(mod), str(rec))
        sess = amct.CalibrationSession(str(mod))
        sess.run(None, {"x": rng.normal(size=(4, 8, 6, 6)).astype(np.float32)})
        assert set(_blas_threads()) == {2}  # the caller's setting between batches
        sess.run(None, {"x": rng.normal(size=(4, 8, 6, 6)).astype(np.float32)})
        assert set(_blas_threads()) == {2}
    assert len(seen["observe"]) == 2 and len(seen["finish"]) == 1
    assert all(set(t) == {1} for t in seen["observe"] + seen["finish"]), seen


def test_one_blas_thread_limits_a_blas_library_loaded_after_the_first_call():
    """The BLAS libraries are looked up once and kept until a shared library is loaded: one loaded after the first
    calibration batch (scipy's OpenBLAS, imported by a later step) is limited too, and restored after."""
    import subprocess
    import sys

    script = """
import threadpoolctl
from omct.core.parallel import one_blas_thread

def blas():
    return [(i["filepath"], i["num_threads"]) for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]

with threadpoolctl.threadpool_limits(limits=2, user_api="blas"):
    with one_blas_thread():
        pass
    before = {f for f, _ in blas()}
    import scipy.linalg  # noqa: F401 - loads scipy's own OpenBLAS
    added = {f for f, _ in blas()} - before
    assert added, "scipy brought no BLAS library of its own"
    threadpoolctl.threadpool_limits(limits=2, user_api="blas")
    with one_blas_thread():
        inside = blas()
    after = blas()
assert all(n == 1 for _, n in inside) and {f for f, _ in inside} >= added, inside
assert all(n == 2 for _, n in after), after
print("ok")
"""
    pytest.importorskip("scipy")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]
