"""math_reward.score_batch's worker pool: timeouts, a killed worker, the memory limit, Ctrl-C.
"""

import os
import signal
import time

import pytest

from conftest import boxed
from math_reward import score_batch

HANG_SCORER = """
import time
from math_reward import math_reward

def hang_on_marker(completion, gold):
    if completion == "hang":  # never returns: only the pool's timeout gets past it
        time.sleep(3600)
    return math_reward(completion, gold)
"""


@pytest.fixture
def hang_on_marker(tmp_path, monkeypatch):
    """A scorer that never returns on the completion "hang", in a small module the spawned workers
    can import by name (workers unpickle the scorer by importing its module; this file is heavy)."""
    (tmp_path / "hang_scorer.py").write_text(HANG_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import math_reward as math_reward_module

    if math_reward_module._pool is not None:  # workers spawned earlier could not import the new module
        math_reward_module._pool.close()
        math_reward_module._pool = None
    import importlib

    return importlib.import_module("hang_scorer").hang_on_marker


def test_score_batch_scores_and_survives_a_hanging_item(hang_on_marker):
    completions = [boxed("\\frac12"), "hang", boxed("3"), boxed("(1,2)")] * 2
    golds = ["0.5", "1", "4", "(1,2)"] * 2
    scores, n_timeouts = score_batch(completions, golds, timeout=1.0, n_workers=2, scorer=hang_on_marker)
    assert scores == [1.0, 0.0, 0.0, 1.0] * 2
    assert n_timeouts == 2
    start = time.perf_counter()  # the stuck workers were replaced: the pool still works, and fast
    scores, n_timeouts = score_batch([boxed("x+x")] * 32, ["2x"] * 32, n_workers=2)
    elapsed = time.perf_counter() - start
    assert scores == [1.0] * 32 and n_timeouts == 0
    print(f"\nscore_batch, 32 items on a warm pool: {elapsed * 1000:.0f} ms")
    assert elapsed < 5.0


def test_a_worker_killed_while_idle_is_replaced():
    score_batch([boxed("1")] * 2, ["1"] * 2, n_workers=2)  # the pool is up and idle
    import math_reward as math_reward_module

    victim = math_reward_module._pool.workers[0].process
    os.kill(victim.pid, signal.SIGKILL)
    victim.join(timeout=10)
    scores, n_timeouts = score_batch([boxed("1"), boxed("2"), boxed("3"), boxed("4")], ["1", "2", "3", "5"],
                                     n_workers=2)
    assert scores[1:] == [1.0, 1.0, 0.0] and scores[0] in (0.0, 1.0) and n_timeouts == (scores[0] == 0.0)
    assert all(worker.process.is_alive() for worker in math_reward_module._pool.workers)


MEMORY_SCORER = """
import resource
def address_space_limit(completion, gold):
    return float(resource.getrlimit(resource.RLIMIT_AS)[0])
"""


def test_workers_run_under_an_address_space_limit(tmp_path, monkeypatch):
    (tmp_path / "memory_scorer.py").write_text(MEMORY_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    import math_reward as math_reward_module

    if math_reward_module._pool is not None:
        math_reward_module._pool.close()
        math_reward_module._pool = None
    scorer = importlib.import_module("memory_scorer").address_space_limit
    (limit,), _ = score_batch(["x"], ["x"], n_workers=1, scorer=scorer)
    import resource

    # a few GiB, not the machine's memory
    assert limit != float(resource.RLIM_INFINITY) and limit < 64 * 2**30


def test_score_batch_workers_ignore_ctrl_c():
    import math_reward as module

    score_batch([boxed("1")], ["1"], n_workers=3)  # a new pool: its workers may still be importing
    for worker in module._pool.workers:
        os.kill(worker.process.pid, signal.SIGINT)  # what Ctrl-C sends to the process group
    time.sleep(0.5)
    assert all(worker.process.is_alive() for worker in module._pool.workers)
    assert score_batch([boxed("1")] * 6, ["1"] * 6, n_workers=3) == ([1.0] * 6, 0)
