"""A load test of ``difflab serve`` on loopback, bounded in count and time: 20 clients at once are all served,
one job at a time in queue order, none lost, the server's memory flat from one round to the next; 10 clients
that disconnect mid-job leave no job running or waiting, nothing in memory and nothing in the gallery."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from serve_helpers import events, wait_until

pytestmark = pytest.mark.usefixtures("single_thread")
CLIENTS = 20
JOB = {"model": "digits", "n": 2, "steps": 5, "label": "all"}


def _status(url):
    return httpx.get(f"{url}/api/status", timeout=10).json()


def _round(url: str, k: int) -> list[list[tuple[str, dict]]]:
    """k clients POST at once (a barrier) and read their streams to the end; each one's events."""
    barrier, results, errors = threading.Barrier(k), [None] * k, []

    def client(i):
        try:
            barrier.wait(10)
            with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/api/sample", json={**JOB, "seed": i}) as r:
                assert r.status_code == 200, r.read()
                results[i] = events(r)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors and all(not t.is_alive() for t in threads), errors
    return results


def test_twenty_clients_at_once_are_served_in_queue_order_none_lost_memory_flat(server):
    url = server.url
    before = len(httpx.get(f"{url}/api/gallery").json()["entries"])
    start = time.monotonic()
    first = _round(url, CLIENTS)
    rss1 = _status(url)["rss_mb"]
    t1 = time.monotonic() - start
    second = _round(url, CLIENTS)
    rss2 = _status(url)["rss_mb"]
    t2 = time.monotonic() - start - t1
    for results in (first, second):
        assert all(evs[-1][0] == "done" for evs in results), [evs[-1] for evs in results]
        done = sorted((evs[-1][1] for evs in results), key=lambda d: d["seq"])
        assert len({d["entry"]["id"] for d in done}) == CLIENTS
        for a, b in zip(done, done[1:], strict=False):  # one at a time, in the order they were queued
            assert a["started"] < b["started"] and a["finished"] <= b["started"] + 1e-3
        for evs in results:  # each was told its place, counting down to its turn
            aheads = [evs[0][1]["ahead"]] + [d["ahead"] for n, d in evs if n == "queued"]
            assert aheads == sorted(aheads, reverse=True) and aheads[-1] in (0, 1)
            assert [n for n, _ in evs].count("started") == 1
    entries = httpx.get(f"{url}/api/gallery").json()["entries"]
    assert len(entries) == before + 2 * CLIENTS
    status = _status(url)
    assert status["running"] == {} and status["waiting"] == {} and status["jobs"] == 0 and status["workers"] == 0
    print(f"\n20 clients: round 1 {t1:.2f} s, round 2 {t2:.2f} s; server RSS {rss1:.1f} -> {rss2:.1f} MB")
    assert rss2 - rss1 < 15, (rss1, rss2)


def test_ten_clients_disconnecting_mid_job_leave_no_job_running(server):
    url = server.url
    _round(url, 1)  # warm: the model is loaded
    status0 = _status(url)
    before = len(httpx.get(f"{url}/api/gallery").json()["entries"])
    gone, barrier = [], threading.Barrier(10)

    def client(i):
        barrier.wait(10)
        body = {"model": "digits", "n": 32, "steps": 100, "seed": i}
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}/api/sample", json=body) as r:
            assert r.status_code == 200
            name = None
            for line in r.iter_lines():  # the running one leaves at its first step, the others while waiting
                if line.startswith("event: "):
                    name = line[7:]
                if name in ("progress", "queued"):
                    break
        gone.append(i)  # the stream is closed here, mid-job

    threads = [threading.Thread(target=client, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(gone) == 10
    start = time.monotonic()
    status = wait_until(lambda: (s := _status(url))["jobs"] == 0 and s["running"] == {} and s["waiting"] == {}
                        and s["workers"] == 0 and s, timeout=15)
    freed = time.monotonic() - start
    assert status["finished"]["cancelled"] - status0["finished"]["cancelled"] == 10
    assert status["finished"]["done"] == status0["finished"]["done"]
    assert len(httpx.get(f"{url}/api/gallery").json()["entries"]) == before
    print(f"\n10 disconnects: no job left {freed:.2f} s after the last; RSS {status0['rss_mb']:.1f} -> "
          f"{status['rss_mb']:.1f} MB")
    assert status["rss_mb"] - status0["rss_mb"] < 15
    assert _round(url, 1)[0][-1][0] == "done"  # and it still serves
