"""ReplacingActorPool (Ray's ActorPool with renewed members): a member whose actor dies gets a fresh one and
keeps its place, every call it lost comes back with its value (none lost, none done twice), and an error of
the work itself passes through without costing the member its place."""

from __future__ import annotations

import time

import pytest
from ray.exceptions import RayTaskError

from lorif_ray.distributed.actor_pool import LostCall, Member, ReplacingActorPool


class Doubler:
    def double(self, x: int, delay: float) -> int:
        time.sleep(delay)
        if x < 0:
            raise ValueError(f"negative: {x}")
        return 2 * x


def _pool(ray_cluster, calls_per_member: int = 2):
    remote = ray_cluster.remote(Doubler).options(num_cpus=0)
    members = [Member(lambda: [remote.remote()]) for _ in range(2)]
    deaths = []

    def renew(member, error):
        deaths.append(member)
        member.renew()

    pool = ReplacingActorPool(members, lambda member, x: (member.actor.double.remote(x, 0.3), [], None),
                              calls_per_member, renew)
    return pool, members, deaths


def test_a_dead_member_is_renewed_once_and_its_lost_calls_come_back(ray_cluster):
    pool, members, deaths = _pool(ray_cluster)
    for x in range(10):
        pool.put(x)  # 4 in flight (2 members x 2 calls), 6 queued
    victim = members[0].actor
    ray_cluster.kill(victim, no_restart=True)
    results, lost = {}, []
    while pool.has_next():
        try:
            value, result, _ = pool.get_next_unordered()
        except LostCall as call:
            lost.append(call.value)
            pool.put(call.value)
            continue
        assert value not in results
        results[value] = result
    assert results == {x: 2 * x for x in range(10)}
    assert lost and deaths == [members[0]] and members[0].actor != victim and members[0].generation == 1
    assert pool.has_free()  # every slot is back: the renewed member's too


def test_an_error_of_the_work_passes_through_and_the_member_stays(ray_cluster):
    pool, members, deaths = _pool(ray_cluster, calls_per_member=1)
    pool.put(-1)
    with pytest.raises(RayTaskError, match="negative: -1"):
        pool.get_next_unordered()
    pool.put(3)
    pool.put(4)
    assert sorted(pool.get_next_unordered()[:2] for _ in range(2)) == [(3, 6), (4, 8)]
    assert deaths == [] and all(m.generation == 0 for m in members)



def test_members_take_calls_in_turn_so_one_that_died_idle_is_renewed(ray_cluster):
    """One call at a time: consecutive calls go to the members in turn (Ray's pool would reuse the last freed
    one forever), so a member that died while idle is found at its turn, renewed, and its call comes back."""
    pool, members, deaths = _pool(ray_cluster, calls_per_member=1)
    ray_cluster.kill(members[0].actor, no_restart=True)
    results, lost = {}, []
    for x in (1, 2):
        pool.put(x)
        try:
            value, result, _ = pool.get_next_unordered()
            results[value] = result
        except LostCall as call:
            lost.append(call.value)
    assert len(lost) == 1 and deaths == [members[0]]
    pool.put(lost[0])
    value, result, _ = pool.get_next_unordered()
    assert {**results, value: result} == {1: 2, 2: 4}
