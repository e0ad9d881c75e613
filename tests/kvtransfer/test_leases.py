"""LeaseTable: grant, confirm, expire; each lease's blocks come back exactly once."""

from __future__ import annotations

import threading

import pytest

from tandem.kvtransfer.leases import LeaseTable


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_release_returns_blocks_once():
    table = LeaseTable(FakeClock())
    table.grant("r1", [4, 5, 6], ttl_s=30)
    assert "r1" in table
    assert table.release("r1") == (4, 5, 6)
    assert table.release("r1") is None
    assert len(table) == 0


def test_expire_returns_only_overdue_leases_and_release_after_expiry_is_none():
    clock = FakeClock()
    table = LeaseTable(clock)
    table.grant("short", [1], ttl_s=5)
    table.grant("long", [2, 3], ttl_s=30)
    assert table.expire() == []
    clock.now += 5
    assert table.expire() == [("short", (1,))]
    assert table.release("short") is None  # already freed by expiry: never freed twice
    assert table.expire(now=clock.now + 25) == [("long", (2, 3))]
    assert len(table) == 0


def test_grant_refuses_duplicates_and_bad_ttl():
    table = LeaseTable(FakeClock())
    table.grant("r1", [1], ttl_s=1)
    with pytest.raises(ValueError, match="already holds"):
        table.grant("r1", [2], ttl_s=1)
    with pytest.raises(ValueError, match="ttl_s"):
        table.grant("r2", [2], ttl_s=0)


def test_concurrent_release_and_expire_free_each_lease_once():
    clock = FakeClock()
    table = LeaseTable(clock)
    for i in range(2000):
        table.grant(f"r{i}", [i], ttl_s=1)
    clock.now += 1
    freed: list[int] = []
    lock = threading.Lock()

    def confirm() -> None:
        for i in range(2000):
            blocks = table.release(f"r{i}")
            if blocks is not None:
                with lock:
                    freed.extend(blocks)

    def reap() -> None:
        for _ in range(50):
            for _, blocks in table.expire():
                with lock:
                    freed.extend(blocks)

    threads = [threading.Thread(target=confirm), threading.Thread(target=reap)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    freed.extend(b for _, blocks in table.expire() for b in blocks)
    assert sorted(freed) == list(range(2000))
