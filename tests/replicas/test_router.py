"""The router's choices on scripted states (pure Python, no Ray), and its keys against the engine's."""

from __future__ import annotations

import pytest

from llmos.engine import SamplingParams
from llmos.engine.block_manager import BlockManager, prefix_hashes
from llmos.engine.sequence import Sequence
from llmos.replicas.router import NoReplicaError, Router

A = [101, 102, 103, 104]  # block keys of a prompt, as prefix_hashes gives them
B = [201, 202]


def test_prefix_hashes_are_the_keys_the_engine_looks_up() -> None:
    ids = list(range(7, 7 + 70))
    seq = Sequence("r", 0, list(ids), len(ids), SamplingParams())
    BlockManager(num_blocks=16, block_size=16).match_prefix(seq)  # fills seq.block_hashes
    assert len(seq.block_hashes) == 4
    assert prefix_hashes(ids, 16) == seq.block_hashes
    assert prefix_hashes(ids[:40], 16) == seq.block_hashes[:2]  # a shared prefix: the same leading keys
    assert prefix_hashes([0, *ids[1:]], 16)[1:] != seq.block_hashes[1:3]  # keys chain: all before counts


def test_round_robin_takes_turns_and_skips_replicas_that_are_down() -> None:
    r = Router(3, "round-robin")
    assert [r.choose(A) for _ in range(4)] == [0, 1, 2, 0]
    r.lost(2)
    assert [r.choose(A) for _ in range(3)] == [1, 0, 1]
    assert r.choose(A, exclude=[0]) == 1


def test_least_loaded_counts_in_flight_then_kv_usage_then_index() -> None:
    r = Router(3, "least-loaded")
    r.routed(0, A)
    r.routed(0, A)
    r.routed(1, B)
    assert r.choose(A) == 2  # holds A's prefix on 0 but is least loaded: 2
    r.routed(2, [])
    r.finished(1, kv_usage=0.5)
    r.finished(2, kv_usage=0.2)
    assert (r.replicas[1].in_flight, r.replicas[2].in_flight) == (0, 0)
    assert r.choose(A) == 2  # ties on load: the lower KV usage


def test_prefix_goes_to_the_longest_prefix_held() -> None:
    r = Router(2, "prefix")
    r.routed(0, A[:2])
    r.routed(1, A[:3])
    assert r.choose(A) == 1
    assert r.choose([*A[:2], 999]) == 0  # both hold its 2 blocks, both have 1 in flight: the lower index
    r.finished(1)
    assert r.choose([*A[:2], 999]) == 1  # the same match: the one with fewer in flight


def test_prefix_passes_over_an_overloaded_replica() -> None:
    r = Router(2, "prefix", max_imbalance=2)
    r.routed(0, A)
    r.routed(0, A)
    assert r.choose(A) == 0  # 2 in flight against 0 on the other: within the imbalance allowed
    r.routed(0, A)
    assert r.choose(A) == 1  # 3 against 0: overloaded, whatever it holds
    r.routed(1, B)
    assert r.choose(A) == 0  # 3 against 1: within again


def test_a_session_sticks_to_its_replica_while_it_is_not_overloaded() -> None:
    r = Router(2, "prefix", max_imbalance=1)
    r.routed(1, [], session="agent-7")
    assert r.choose([], session="agent-7") == 1  # no prefix held anywhere: its session's replica
    assert r.choose([], session="other") == 0  # a new session: the least loaded
    r.routed(1, [], session="agent-7")
    assert r.choose([], session="agent-7") == 0  # 2 in flight against 0: overloaded, so passed over


def test_a_lost_replica_is_forgotten_and_never_chosen_until_restored() -> None:
    r = Router(2, "prefix")
    r.routed(0, A, session="s")
    r.lost(0)
    assert (r.replicas[0].blocks, r.replicas[0].in_flight, "s" in r.sessions) == ({}, 0, False)
    assert r.choose(A, session="s") == 1
    r.lost(1)
    with pytest.raises(NoReplicaError):
        r.choose(A)
    r.restored(0)
    assert r.choose(A) == 0
    with pytest.raises(NoReplicaError):
        r.choose(A, exclude=[0])


def test_the_map_is_trimmed_to_the_reported_capacity_least_recent_first() -> None:
    r = Router(1, "prefix")
    r.routed(0, A)
    r.routed(0, B)
    r.finished(0, kv_usage=0.1, capacity=3)
    assert list(r.replicas[0].blocks) == [104, 201, 202]
    assert r.replicas[0].match(A) == 0  # its first block is gone, so no prefix of A is held


def test_an_unknown_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown router 'random'"):
        Router(2, "random")


def test_prefix_places_a_new_session_where_fewer_blocks_are_held() -> None:
    r = Router(2, "prefix")
    r.routed(0, A)
    r.finished(0)
    assert r.choose(B, session="new") == 1  # both idle; 0 holds 4 blocks, 1 none
    assert Router(2, "least-loaded").choose(B) == 0  # least-loaded alone: the lower index
