"""`engine serve`: answers equal to engine.search under concurrency, batching, refusals, images, client, reload."""
import io
import json
import socket
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from PIL import Image

import engine
from engine.files import write_bytes
from engine.index import Index
from engine.serve.app import QueryEncoder, ServeConfig, create_app
from engine.store import add_copy, open_store, write_store

N, D, SPACE = 2000, 64, "test:serve"


def unit_rows(n, seed):
    x = np.random.default_rng(seed).standard_normal((n, D)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def gallery(tmp_path_factory):
    """A 2000 x 64 store in three shards, with an int8 copy (so the default search is int8 rescored in float32)."""
    path = tmp_path_factory.mktemp("serve") / "g.store"
    write_store(path, unit_rows(N, 0), SPACE, names=[f"img{i:05d}" for i in range(N)], shard_rows=700)
    add_copy(path, "int8")
    return path


class Server:
    """uvicorn in a background thread on a free loopback port; stopped by its own handle."""

    def __init__(self, app):
        import uvicorn

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)  # TCP: asyncio sets TCP_NODELAY
        self.sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="error", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        for _ in range(500):
            if self.server.started:
                break
            self.thread.join(0.01)
        assert self.server.started

    def stop(self):
        self.server.should_exit = True
        self.thread.join(10)
        self.sock.close()


@pytest.fixture(scope="module")
def encoder():
    from engine.models import build

    return QueryEncoder(build("mobilenetv2", dim=D, space=SPACE), max_side=64, runner="torch")


@pytest.fixture(scope="module")
def server(gallery, encoder):
    s = Server(create_app(Index([gallery]), ServeConfig(max_wait_ms=20, max_body_mb=1, max_k=500), encoder))
    yield s
    s.stop()


def test_64_concurrent_clients_get_exactly_engine_search_and_are_batched(gallery, server):
    store = open_store(gallery)
    queries = unit_rows(64 * 3, 1)
    ks = [1 + (i % 3) * 7 for i in range(len(queries))]  # three k's: batched only with their equals (rescored)
    expected = [engine.search(store, q, k) for q, k in zip(queries, ks)]
    names = store.names()
    start = threading.Barrier(64)
    before = httpx.get(server.url + "/stats").json()
    with engine.Client(server.url) as client:

        def one_client(c):
            start.wait(10)
            out = []
            for i in range(c, len(queries), 64):
                if i % 2:  # the client (an .npy body); a quarter without names, in the same blocks as the others
                    hits = client.search(queries[i], ks[i], names=i % 4 == 3)
                    out.append((i, hits.scores, hits.ids, hits.names))
                else:  # the JSON form of the same request
                    r = httpx.post(server.url + "/search", json={"queries": [queries[i].tolist()], "k": ks[i]}, timeout=60)
                    assert r.status_code == 200, r.text
                    body = r.json()
                    out.append((i, np.array(body["scores"], np.float32), np.array(body["ids"]), body["names"]))
            return out

        with ThreadPoolExecutor(64) as pool:
            answers = [a for part in pool.map(one_client, range(64)) for a in part]
    assert len(answers) == len(queries)
    for i, got_scores, got_ids, got_names in answers:
        scores, ids = expected[i]
        np.testing.assert_array_equal(got_ids, ids)
        np.testing.assert_array_equal(got_scores, scores)
        assert got_names == ([[names[j] for j in ids[0]]] if i % 4 != 1 else None)
    after = httpx.get(server.url + "/stats").json()
    served, blocks = after["queries"] - before["queries"], after["blocks"] - before["blocks"]
    assert served == len(queries) and blocks < served  # mean block size > 1: concurrent requests shared scans
    assert after["mean_block"] > 1 and after["latency_ms"]["p50"] > 0 and after["latency_ms"]["p99"] >= after["latency_ms"]["p50"]


def npy(array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array)
    return buf.getvalue()


BAD = [
    ("wrong D", dict(json={"queries": [[0.1] * (D - 1)], "k": 5}), 422, "D = 63"),
    ("NaN", dict(content=b'{"queries": [[NaN' + b", 0.1" * (D - 1) + b']], "k": 5}',
                 headers={"Content-Type": "application/json"}), 422, "NaN"),
    ("inf in npy", dict(content=npy(np.full((1, D), np.inf, np.float32)), params={"k": 5},
                        headers={"Content-Type": "application/x-npy"}), 422, "NaN or infinite"),
    ("k = 0", dict(json={"queries": [[0.1] * D], "k": 0}), 422, "k must be a positive integer"),
    ("k huge", dict(json={"queries": [[0.1] * D], "k": 10**12}), 422, "--max-k"),
    ("k float", dict(json={"queries": [[0.1] * D], "k": 2.5}), 422, "k must be"),
    ("k missing", dict(json={"queries": [[0.1] * D]}), 422, "'k' is required"),
    ("malformed JSON", dict(content=b'{"queries": [[0.1,', headers={"Content-Type": "application/json"}), 400, "not valid JSON"),
    ("JSON not an object", dict(json=[1, 2]), 422, "JSON object"),
    ("strings", dict(json={"queries": [["a"] * D], "k": 5}), 422, "real numbers"),
    ("ragged", dict(json={"queries": [[0.1] * D, [0.1]], "k": 5}), 422, "Q x D"),
    ("unknown field", dict(json={"queries": [[0.1] * D], "k": 5, "kk": 1}), 422, "unknown field 'kk'"),
    ("bad scan", dict(json={"queries": [[0.1] * D], "k": 5, "scan": "float64"}), 422, "float64"),
    ("scan of an absent copy", dict(json={"queries": [[0.1] * D], "k": 5, "scan": "bfloat16"}), 422, "no bfloat16 copy"),
    ("names not a boolean", dict(json={"queries": [[0.1] * D], "k": 5, "names": "yes"}), 422, "names must be true or false"),
    ("rescore negative", dict(json={"queries": [[0.1] * D], "k": 5, "rescore": -1}), 422, "rescore"),
    ("other space", dict(json={"queries": [[0.1] * D], "k": 5, "space": "elsewhere:1"}), 422, "space"),
    ("not an npy", dict(content=b"\x93NUMPY garbage", params={"k": 5}, headers={"Content-Type": "application/x-npy"}), 400, ".npy"),
    ("npy without k", dict(content=npy(np.zeros((1, D), np.float32)), headers={"Content-Type": "application/x-npy"}), 422, "k is required"),
    ("object npy", dict(content=b"", params={"k": 5}, headers={"Content-Type": "application/x-npy"}), 400, ".npy"),
    ("no queries", dict(content=npy(np.zeros((0, D), np.float32)), params={"k": 5},
                        headers={"Content-Type": "application/x-npy"}), 422, "no queries"),
    ("other media type", dict(content=b"x", headers={"Content-Type": "text/plain"}), 415, "Content-Type"),
    ("oversize by Content-Length", dict(content=b"[" + b"0," * (2**20) + b"0]", headers={"Content-Type": "application/json"}), 413, "limit"),
]


@pytest.mark.parametrize("case, request_kwargs, status, reason", BAD, ids=[b[0] for b in BAD])
def test_bad_requests_get_a_4xx_with_a_one_line_reason(server, case, request_kwargs, status, reason):
    r = httpx.post(server.url + "/search", timeout=30, **request_kwargs)
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and reason in body["error"] and "\n" not in body["error"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # still answering


def test_oversize_chunked_body_is_cut_off_while_reading(server):
    def chunks():
        for _ in range(40):
            yield b"0" * 65536  # 2.5 MiB, no Content-Length

    r = httpx.post(server.url + "/search", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "limit" in r.json()["error"]
    assert httpx.get(server.url + "/health").status_code == 200


def test_unknown_route_and_method_are_json_4xx(server):
    r = httpx.get(server.url + "/nowhere")
    assert r.status_code == 404 and "error" in r.json()
    r = httpx.get(server.url + "/search")
    assert r.status_code == 405 and "error" in r.json()


def photo_bytes(fmt="PNG") -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.astronaut()[::4, ::4]).save(buf, fmt)
    return buf.getvalue()


def test_search_image_equals_encoding_with_the_student_then_engine_search(server, gallery, encoder, tmp_path):
    from engine.encode import EncodeOptions, encode_to_array

    (tmp_path / "q.png").write_bytes(photo_bytes())
    bbx = [10, 20, 100, 110]
    store = open_store(gallery)
    for box in (None, bbx):
        vec, _, _ = encode_to_array(encoder.encoder, [(tmp_path / "q.png", box)],
                                    EncodeOptions(max_side=64, workers=0, backend="torch", progress=False))
        scores, ids = engine.search(store, vec, 7, space=SPACE)
        with engine.Client(server.url) as client:
            got = client.search_image(tmp_path / "q.png", 7, bbx=box)
        np.testing.assert_array_equal(got.ids, ids)
        np.testing.assert_array_equal(got.scores, scores)
    # the raw body form, bbx as a query parameter
    r = httpx.post(server.url + "/search/image", content=photo_bytes(), params={"k": 7, "bbx": "10,20,100,110"},
                   headers={"Content-Type": "image/png"})
    assert r.status_code == 200 and r.json()["ids"] == ids.tolist()


@pytest.mark.parametrize("kwargs, status, reason", [
    (dict(files={"image": ("x.jpg", b"not an image at all")}, params={"k": 3}), 422, "cannot decode image"),
    (dict(files={"image": ("x.png", photo_bytes())}, data={"bbx": "5,5,nan,9"}, params={"k": 3}), 422, "bbx"),
    (dict(files={"image": ("x.png", photo_bytes())}, data={"bbx": "500,500,600,600"}, params={"k": 3}), 422, "empty"),
    (dict(files={"other": ("x.png", photo_bytes())}, params={"k": 3}), 422, "'image' field"),
    (dict(files={"image": ("x.png", photo_bytes())}), 422, "k is required"),
    (dict(content=b"", params={"k": 3}), 422, "no image"),
])
def test_bad_images_are_refused_and_the_server_goes_on(server, kwargs, status, reason):
    r = httpx.post(server.url + "/search/image", timeout=30, **kwargs)
    assert r.status_code == status, r.text
    assert reason in r.json()["error"] and "/tmp" not in r.json()["error"]  # the server's own file names stay its own
    assert httpx.get(server.url + "/health").status_code == 200


def test_client_and_search_url_write_the_local_result(server, gallery, tmp_path, run_cli):
    from engine.encode import save_vectors
    from engine.results import load_results

    q = unit_rows(5, 3)
    save_vectors(tmp_path / "q.npy", q, {"space": SPACE, "dim": D})
    assert run_cli("search", gallery, "--queries", tmp_path / "q.npy", "-k", 9, "--out", tmp_path / "local.npz")[0] == 0
    code, _, err = run_cli("search", "--url", server.url, "--queries", tmp_path / "q.npy", "-k", 9, "--out", tmp_path / "remote.npz")
    assert code == 0, err
    local, remote = load_results(tmp_path / "local.npz"), load_results(tmp_path / "remote.npz")
    np.testing.assert_array_equal(remote[0], local[0])
    np.testing.assert_array_equal(remote[1], local[1])
    with engine.Client(server.url) as client:
        scores, ids = client.search(q, 9)
    np.testing.assert_array_equal(ids, local[0])
    np.testing.assert_array_equal(scores, local[1])
    # one form or the other, and a refusal of the server is one line naming it
    code, _, err = run_cli("search", gallery, "--url", server.url, "--queries", tmp_path / "q.npy", "--out", tmp_path / "x.npz")
    assert code == 1 and "exactly one" in err
    code, _, err = run_cli("search", "--url", server.url, "--queries", tmp_path / "q.npy", "-k", 10**6, "--out", tmp_path / "x.npz")
    assert code == 1 and "--max-k" in err and err.count("\n") == 1 and not (tmp_path / "x.npz").exists()
    code, _, err = run_cli("search", "--url", "http://127.0.0.1:9", "--queries", tmp_path / "q.npy", "--out", tmp_path / "x.npz")
    assert code == 1 and "cannot reach" in err and err.count("\n") == 1


def test_reload_serves_the_new_generation(tmp_path):
    path = tmp_path / "g.store"
    old, new = unit_rows(300, 4), unit_rows(400, 5)
    write_store(path, old, SPACE, shard_rows=128)
    server = Server(create_app(Index([path]), ServeConfig()))
    try:
        q = unit_rows(3, 6)
        with engine.Client(server.url) as client:
            np.testing.assert_array_equal(client.search(q, 5)[1], engine.search(open_store(path), q, 5)[1])
            capped = httpx.post(server.url + "/search", json={"queries": q.tolist(), "k": 1000}).json()
            assert capped["k"] == 300 and np.array(capped["ids"]).shape == (3, 300)  # k above the gallery: all of it, said
            generation = open_store(path).generation
            write_store(path, new, SPACE, shard_rows=128, overwrite=True)
            manifest = json.loads((path / "manifest.json").read_text())
            manifest["generation"] = max(manifest.get("generation", 0), generation + 1)  # published as a new generation
            write_bytes(path / "manifest.json", json.dumps(manifest).encode())
            reloaded = client.reload()
            assert reloaded["changed"] and reloaded["count"] == 400
            assert client.health()["generation"] == [manifest["generation"]]
            scores, ids = client.search(q, 5)
            expected = engine.search(open_store(path), q, 5)
            np.testing.assert_array_equal(ids, expected[1])
            np.testing.assert_array_equal(scores, expected[0])
            assert not client.reload()["changed"]
    finally:
        server.stop()


def test_serve_options_default_to_the_library(run_cli):
    import dataclasses

    from engine import cli
    from engine.cli.options import all_params

    params = {p.name: p for cmd, p in all_params(cli.app) if cmd == "engine serve"}
    for field in dataclasses.fields(ServeConfig):
        assert params[field.name].default == field.default, field.name
    assert params["host"].default == "127.0.0.1"


def test_serve_command_builds_the_index_and_the_student_for_the_first_store(gallery, run_cli, monkeypatch):
    from engine.serve import app as serve_app

    started = {}
    monkeypatch.setattr(serve_app, "serve", lambda index, host, port, config, encoder: started.update(locals()))
    code, _, err = run_cli("serve", gallery, "--student", "mobilenetv2", "--runner", "torch", "--max-side", 64,
                           "--port", 8123, "--max-batch", 8, "--blocks", 1)
    assert code == 0, err
    assert started["index"].count == N and (started["host"], started["port"]) == ("127.0.0.1", 8123)
    assert (started["config"].max_batch, started["config"].blocks) == (8, 1)
    assert (started["encoder"].encoder.space, started["encoder"].encoder.dim) == (SPACE, D)
    code, _, err = run_cli("serve", gallery, "--model", "x", "--student", "mobilenetv2")
    assert code == 1 and "exactly one" in err


def test_engine_serve_runs_as_a_command(gallery):
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-c", "from engine.cli import main; main()", "serve", str(gallery),
                             "--port", str(port)], stderr=subprocess.PIPE, text=True)
    try:
        with engine.Client(f"http://127.0.0.1:{port}") as client:
            for _ in range(300):
                try:
                    health = client.health()
                    break
                except engine.EngineError:
                    assert proc.poll() is None, proc.stderr.read()
                    time.sleep(0.05)
            assert (health["status"], health["count"], health["dim"]) == ("ok", N, D)
            q = unit_rows(2, 7)
            np.testing.assert_array_equal(client.search(q, 4)[1], engine.search(open_store(gallery), q, 4)[1])
    finally:
        proc.terminate()
        proc.wait(30)
