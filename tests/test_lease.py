"""The library's lease, used from Python against a real Redis."""

from __future__ import annotations

import threading
import time

import pytest
from servers import RedisServer

from cronguard import Lease, LeaseHeld, LeaseLost, Store, StoreSettings


@pytest.fixture
def store(redis_server: RedisServer) -> Store:
    return Store(StoreSettings(url=redis_server.url, timeout=1.0))


def test_context_manager_holds_the_lease_and_releases_it(
    store: Store, key: str
) -> None:
    with Lease(store, key, ttl=5) as lease:
        assert lease.fence is not None and lease.fence >= 1
        with pytest.raises(LeaseHeld) as held:
            Lease(store, key, ttl=5).__enter__()
        assert held.value.key == key
    assert not store.client.exists(lease.lease_key)


def test_hold_keeps_the_lease_until_ttl_after_acquisition(
    store: Store, key: str
) -> None:
    with Lease(store, key, ttl=3, hold=True) as lease:
        pass
    left = store.client.pttl(lease.lease_key)
    assert 2000 < left <= 3000


def test_a_retried_acquisition_keeps_its_fence(store: Store, key: str) -> None:
    lease = Lease(store, key, ttl=5)
    assert lease.try_acquire() is None
    first = lease.fence
    assert lease.try_acquire() is None, "its own earlier attempt must count as won"
    assert lease.fence == first
    lease.release()


def test_fences_strictly_increase_over_holders(store: Store, key: str) -> None:
    fences = []
    for _ in range(5):
        with Lease(store, key, ttl=5) as lease:
            fences.append(lease.fence)
    assert fences == sorted(set(fences))


def test_renewal_outlives_the_ttl(store: Store, key: str) -> None:
    with Lease(store, key, ttl=0.3) as lease:
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            lease.check()  # raises if the keeper let it lapse
            assert store.client.exists(lease.lease_key)
            time.sleep(0.05)


def test_a_stolen_lease_is_reported_lost(store: Store, key: str) -> None:
    lost = threading.Event()
    lease = Lease(store, key, ttl=0.3)
    lease.on_change(lost.set)
    with lease:
        store.client.set(lease.lease_key, "0" * 32 + " {}", px=10_000)
        assert lost.wait(5), "the keeper did not notice"
        with pytest.raises(LeaseLost):
            lease.check()
    # The thief's lease is untouched by the exit.
    assert store.client.get(lease.lease_key).startswith(b"0" * 32)


def test_events_are_recorded_with_the_lease(store: Store, key: str) -> None:
    with Lease(store, key, ttl=5, details={"host": "py-1"}) as holder:
        assert Lease(store, key, ttl=5, details={"host": "py-2"}).try_acquire()
    events = store.client.xrange(holder.runs_key)
    kinds = [(e[b"event"], e[b"host"]) for _, e in events]
    assert kinds == [(b"started", b"py-1"), (b"finished", b"py-1")]
    assert store.client.hget(holder.skips_key, "py-2") == b"1"


def test_a_renewal_left_in_flight_changes_nothing(
    private_redis: RedisServer, key: str
) -> None:
    """Once stop_keeping(wait=False) has returned, a renewal still stuck on
    the store neither marks the lease lost nor moves its deadline when it
    finally fails, long after the lease's deadline."""
    store = Store(StoreSettings(url=private_redis.url, timeout=0.2))
    lease = Lease(store, key, ttl=0.6)
    assert lease.try_acquire() is None and lease.deadline is not None
    # Renewals fall due a third of the way into the lease.
    renewal_due = lease.deadline - lease.ttl * 2 / 3
    private_redis.pause()
    try:
        lease.keep()
        keeper = lease._keeper
        assert keeper is not None
        while time.monotonic() < renewal_due + 0.1:  # the renewal is on its way
            time.sleep(0.01)
        deadline = lease.deadline
        lease.stop_keeping(wait=False)
        keeper.join(10)  # its attempts run out, past the lease's deadline
        assert not keeper.is_alive()
        assert time.monotonic() > deadline
    finally:
        private_redis.resume()
    assert lease.lost_reason is None
    assert lease.deadline == deadline


def test_a_lease_shortened_to_its_hold_refuses_a_late_renewal(
    store: Store, key: str
) -> None:
    """A renewal that reaches the store after the release must not stretch
    the minimum hold again; a retried release still answers as the first."""
    lease = Lease(store, key, ttl=30)
    assert lease.try_acquire() is None
    left = lease.release(hold=5)
    assert 0 < left <= 5
    lease.deadline = time.monotonic() + 30  # as the keeper would still see it
    with pytest.raises(LeaseLost):
        lease.renew()
    assert 0 < store.client.pttl(lease.lease_key) <= 5000
    assert 0 < lease.release(hold=5) <= 5
