"""difflab.threads.share_cores: the intra-op thread count follows the cores other processes leave free."""

from __future__ import annotations

import pytest
import torch

from difflab import threads


@pytest.fixture
def fresh(monkeypatch):
    """share_cores as at a process's start, with torch at 2 threads; the thread count restored after."""
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setattr(threads, "_state", {"next": 0.0, "cores": None})
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(threads, "_usable_cores", lambda: 2)
    yield monkeypatch
    torch.set_num_threads(saved)


def test_threads_follow_the_load_and_come_back(fresh):
    busy = iter([0, 1, 2, 0])
    fresh.setattr(threads, "others_running", lambda: next(busy))
    seen = []
    for k in range(4):
        threads.share_cores(now=10.0 * k)
        seen.append(torch.get_num_threads())
    assert seen == [2, 1, 1, 2]  # alone: both cores; one busy thread elsewhere: one; two: still one; free again


def test_checks_at_most_every_check_seconds(fresh):
    calls = []
    fresh.setattr(threads, "others_running", lambda: calls.append(1) or 1)
    for now in (0.0, 0.5, 1.9, threads.CHECK_SECONDS + 0.01):
        threads.share_cores(now=now)
    assert len(calls) == 2 and torch.get_num_threads() == 1


def test_a_fixed_thread_count_is_never_changed(fresh):
    fresh.setenv("OMP_NUM_THREADS", "2")
    fresh.setattr(threads, "others_running", lambda: 5)
    assert threads.share_cores(now=0.0) is None and torch.get_num_threads() == 2


def test_the_first_count_is_the_cap(fresh):
    torch.set_num_threads(1)  # set by the user before difflab's first check
    fresh.setattr(threads, "others_running", lambda: 0)
    threads.share_cores(now=0.0)
    assert torch.get_num_threads() == 1


def test_others_running_reads_this_machine():
    n = threads.others_running()
    assert n is None or (isinstance(n, int) and n >= 0)
