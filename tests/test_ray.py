"""Shard groups on a local two-node Ray cluster: exact results, replicas on different nodes, no query lost
when an actor dies mid-stream."""
import os
import threading

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from ray.cluster_utils import Cluster  # noqa: E402

from engine import open_store, search  # noqa: E402
from engine.cluster import GroupHolder, ShardGroups, group_shards  # noqa: E402
from engine.search import best_k  # noqa: E402
from engine.store import add_copy, write_store  # noqa: E402

N, D, SHARD_ROWS = 4000, 64, 500  # 8 shards
OBJECT_STORE = 80 * 2**20
SETTINGS = [dict(scan="int8", rescore=4), dict(scan="float32", rescore=0), dict(scan="int8", rescore=0)]


@pytest.fixture(scope="module")
def store_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, D)).astype(np.float32)
    x[600:610] = x[0:10]  # exact ties across shards 0 and 1 (groups 0 and 1): broken by the lower global id
    x[3999] = x[1]
    path = tmp_path_factory.mktemp("ray") / "store"
    write_store(path, x, "space-a", shard_rows=SHARD_ROWS)
    add_copy(path, "int8")
    return path


@pytest.fixture(scope="module")
def queries(store_path):
    rng = np.random.default_rng(1)
    q = rng.standard_normal((500, D)).astype(np.float32)
    q[:10] = open_store(store_path).vectors()[:10]  # their best rows are tied pairs
    return q


@pytest.fixture(scope="module")
def groups(store_path):
    """G = 2, R = 2 on a two-node local cluster (one logical CPU per node, half a CPU per actor)."""
    from ray._private import ray_constants

    # Keep 127.0.0.1 as every node's address (Ray otherwise swaps in this machine's interface address): the
    # variable for the processes the cluster starts, the constant it set when this process imported Ray.
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    mp.setattr(ray_constants, "ENABLE_RAY_CLUSTER", False)
    node = {"num_cpus": 1, "node_ip_address": "127.0.0.1", "object_store_memory": OBJECT_STORE}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    served = None
    try:
        cluster.add_node(**node)
        ray.init(address=cluster.address, log_to_driver=False)
        served = ShardGroups(store_path, address=cluster.address, groups=2, replicas=2, cpus=0.5, threads=1)
        yield served
    finally:
        if served is not None:
            served.close()
        ray.shutdown()
        cluster.shutdown()
        mp.undo()


def test_groups_split_shards_and_merge_exactly_in_process(store_path, queries):
    """Without Ray: the groups' parts merged equal the whole store's search (ties across groups included)."""
    assert group_shards(8, 1, 3) == [1, 4, 7]
    holders = [GroupHolder(str(store_path), g, 3) for g in range(3)]
    assert sum(h.rows for h in holders) == N
    store = open_store(store_path)
    for settings in SETTINGS:
        for k in (1, 7, 100):
            want = search(store, queries[:50], k, **settings)
            parts = [h.search(queries[:50], k, settings["scan"], settings["rescore"], "auto") for h in holders]
            got = best_k(np.concatenate([p[0] for p in parts], 1), np.concatenate([p[1] for p in parts], 1), k)
            np.testing.assert_array_equal(got[1], want[1])
            np.testing.assert_array_equal(got[0], want[0])


def test_replicas_of_a_group_sit_on_different_nodes(groups):
    assert len(ray.nodes()) == 2
    for row in groups.placement:
        assert len({p["node"] for p in row}) == 2
    assert sum(row[0]["rows"] for row in groups.placement) == N
    assert (groups.count, groups.dim, groups.space) == (N, D, "space-a")


@pytest.mark.parametrize("settings", SETTINGS, ids=lambda s: f"{s['scan']}-r{s['rescore']}")
def test_results_equal_in_process_search(groups, store_path, queries, settings):
    store = open_store(store_path)
    for k in (1, 10, 100, N + 5):
        block = queries[:40] if k < N else queries[:3]
        want = search(store, block, k, **settings)
        got = groups.search(block, k, **settings)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert got[1].shape == (3, N)
    assert groups.names(want[1][:1, :3]) == [[str(i) for i in want[1][0, :3]]]


def test_bad_queries_are_refused_before_any_actor(groups):
    from engine import EngineError

    with pytest.raises(EngineError, match="D = 3"):
        groups.search(np.ones((1, 3), np.float32), 5)
    with pytest.raises(EngineError, match="space"):
        groups.search(np.ones((1, D), np.float32), 5, space="space-b")


def test_an_actor_killed_mid_stream_loses_no_query(groups, store_path, queries):
    """500 queries (single ones and blocks of 4) while one replica is killed: every answer equals in-process."""
    want_scores, want_ids = search(open_store(store_path), queries, 10)
    victim = groups.actors[0][0]
    before = ray.get(victim.describe.remote())["pid"]
    answers, errors, done = {}, [], threading.Event()
    half = threading.Event()
    starts = list(range(0, 100)) + list(range(100, 500, 4))

    def stream():
        try:
            for a in starts:
                b = a + 1 if a < 100 else a + 4
                answers[a] = groups.search(queries[a:b], 10)
                if a >= 60:
                    half.set()
        except Exception as e:  # reported by the test below
            errors.append(e)
        finally:
            half.set()
            done.set()

    worker = threading.Thread(target=stream, daemon=True)
    worker.start()
    assert half.wait(60)
    ray.kill(victim, no_restart=False)  # Ray restarts it; its queries in flight go to the other replica
    assert done.wait(120), "the stream did not finish"
    assert not errors, errors
    assert sorted(answers) == starts
    for a, (s, i) in answers.items():
        np.testing.assert_array_equal(i, want_ids[a:a + len(i)])
        np.testing.assert_array_equal(s, want_scores[a:a + len(s)])
    assert ray.get(victim.describe.remote(), timeout=60)["pid"] != before  # restarted, serving again
    assert os.getpid() not in {p["pid"] for row in groups.placement for p in row}


def publish_generation(path, generation):
    """Publish the same rows as a new generation (as a store writer does): only the manifest changes."""
    import json

    from engine.files import write_bytes
    from engine.store import MANIFEST

    manifest = json.loads((path / MANIFEST).read_text())
    manifest["generation"] = generation
    write_bytes(path / MANIFEST, json.dumps(manifest).encode())


def test_a_new_generation_is_taken_whole(groups, store_path, queries):
    """Actors on different generations are never merged: the front end refreshes them all and asks again."""
    want = search(open_store(store_path), queries[:20], 10)
    start = groups.generation[0]
    publish_generation(store_path, start + 1)
    assert groups.refresh() is True and groups.generation == (start + 1,)
    held = ray.get([a.describe.remote() for row in groups.actors for a in row])
    assert {p["generation"] for p in held} == {start + 1}
    publish_generation(store_path, start + 2)
    ray.get(groups.actors[1][0].refresh.remote())  # one replica moves on alone
    for _ in range(2 * groups.replicas):  # every replica is asked at least once
        got = groups.search(queries[:20], 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
    assert groups.generation == (start + 2,)


def test_a_missing_store_or_bad_sizes_are_refused_before_any_actor(tmp_path):
    from engine import EngineError

    with pytest.raises(EngineError, match="manifest|store"):
        ShardGroups(tmp_path / "none", address="unused:1")
    with pytest.raises(EngineError, match="groups"):
        ShardGroups(tmp_path / "none", address="unused:1", groups=0)


def test_the_service_over_shard_groups_answers_as_in_process_search(groups, store_path, queries):
    """`engine serve --ray`: the HTTP service is the same thin layer over ShardGroups as over an Index."""
    from engine.serve.app import ServeConfig, create_app
    from engine.serve.client import Client
    from test_serve import Server

    server = Server(create_app(groups, ServeConfig(max_wait_ms=5)))
    try:
        client = Client(server.url)
        want = search(open_store(store_path), queries[:8], 10)
        got = client.search(queries[:8], 10)
        np.testing.assert_array_equal(got[1], want[1])
        np.testing.assert_array_equal(got[0], want[0])
        assert client.stats()["count"] == N
    finally:
        server.stop()
