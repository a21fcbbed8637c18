"""The downloader against a local HTTP server (with Range support) serving small fixture archives."""
import hashlib
import io
import json
import pickle
import random
import shutil
import tarfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlparse

import pytest

from engine.datasets import download as dl
from engine.errors import EXIT_INPUT, EngineError


class RangeHandler(BaseHTTPRequestHandler):
    """GET of files under `server.folder`, honouring `Range: bytes=N-`; logs (path, range, bytes sent).

    `server.content_range`, a function of (start, size) or None, replaces the Content-Range header (None: sent
    as it should be; the function returning None: left out), for servers that answer resumes badly.
    """

    def do_GET(self):
        # Each request is logged before it is answered: the client's next request may be served by another
        # thread before this one would have returned.
        path = self.server.folder / self.path.lstrip("/")
        if not path.is_file():
            self.server.log.append((self.path, None, 0))
            self.send_error(404)
            return
        data = path.read_bytes()
        rng = self.headers.get("Range") if self.server.ranges else None
        start = int(rng.removeprefix("bytes=").rstrip("-")) if rng else 0
        unsatisfiable = start >= len(data) and rng
        body = b"" if unsatisfiable else data[start:]
        self.server.log.append((self.path, rng, len(body)))
        if unsatisfiable:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(data)}")
            self.end_headers()
            return
        answer = self.server.content_range
        self.send_response(206 if rng or answer else 200)
        header = f"bytes {start}-{len(data) - 1}/{len(data)}" if answer is None else answer(start, len(data))
        if (rng or answer) and header is not None:
            self.send_header("Content-Range", header)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base_url, served folder, request log, server) of a server that mirrors the registry's URL paths."""
    folder = tmp_path / "served"
    folder.mkdir()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.folder, httpd.log, httpd.ranges, httpd.content_range = folder, [], True, None
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", folder, httpd.log, httpd
    httpd.shutdown()
    httpd.server_close()


def tgz(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def serve(folder: Path, url: str, data: bytes) -> None:
    target = folder / urlparse(url).path.lstrip("/")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def rparis_fixture(folder: Path) -> dict:
    """The two Paris archives (nested per landmark, as published) and the ground truth; returns the gnd dict."""
    gnd = {"imlist": ["paris_louvre_000001", "paris_eiffel_000002"], "qimlist": ["paris_louvre_000003"],
           "gnd": [{"bbx": [0, 0, 5, 5], "easy": [0], "hard": [], "junk": [1]}]}
    urls = [r.url for r in dl.DATASETS["rparis6k"]]
    louvre = random.Random(0).randbytes(3000)  # incompressible, so the archive is bigger than the resume offset
    serve(folder, urls[0], tgz({"paris/louvre/paris_louvre_000001.jpg": louvre,
                                "paris/louvre/paris_louvre_000003.jpg": b"c" * 100}))
    serve(folder, urls[1], tgz({"paris/eiffel/paris_eiffel_000002.jpg": b"b" * 200}))
    serve(folder, urls[2], pickle.dumps(gnd))
    return gnd


def test_download_unpacks_layout_and_rerun_is_noop(server, tmp_path):
    base, folder, log, _ = server
    gnd = rparis_fixture(folder)
    root = tmp_path / "data"
    out = dl.download("rparis6k", root, base_url=base)
    assert out == root / "rparis6k"
    assert sorted(p.name for p in (out / "jpg").iterdir()) == [
        "paris_eiffel_000002.jpg", "paris_louvre_000001.jpg", "paris_louvre_000003.jpg"]
    assert (out / "jpg" / "paris_louvre_000001.jpg").read_bytes() == random.Random(0).randbytes(3000)
    assert pickle.loads((out / "gnd_rparis6k.pkl").read_bytes()) == gnd
    assert not list(out.glob("*.tgz")) and not list(out.rglob("*.part"))  # archives deleted once unpacked
    assert sorted(p.name for p in out.glob("*.unpacked")) == ["paris_1-v1.tgz.unpacked", "paris_2-v1.tgz.unpacked"]
    lock = json.loads((out / dl.LOCK).read_text())
    served_gnd = (folder / urlparse(dl.DATASETS["rparis6k"][2].url).path.lstrip("/")).read_bytes()
    assert lock["rparis6k/gnd_rparis6k.pkl"]["sha256"] == hashlib.sha256(served_gnd).hexdigest()
    assert lock["rparis6k/gnd_rparis6k.pkl"]["size"] == len(served_gnd)
    assert len(log) == 3
    dl.download("rparis6k", root, base_url=base)
    assert len(log) == 3  # nothing requested again


def test_sfm_archive_keeps_its_tree(server, tmp_path):
    base, folder, _, _ = server
    cid = "0a1b2c3d4e5f"
    ims, db, whiten = dl.DATASETS["sfm120k"]
    serve(folder, ims.url, tgz({f"{cid[-2:]}/{cid[-4:-2]}/{cid[-6:-4]}/{cid}": b"img"}))
    serve(folder, db.url, pickle.dumps({"train": {}}))
    serve(folder, whiten.url, pickle.dumps({"cids": []}))
    out = dl.download("sfm120k", tmp_path / "data", base_url=base)
    assert (out / "ims" / "5f" / "4e" / "3d" / cid).read_bytes() == b"img"
    assert (out / "dbs" / "retrieval-SfM-120k.pkl").is_file() and (out / "dbs" / "retrieval-SfM-120k-whiten.pkl").is_file()


def test_resume_requests_only_the_missing_bytes(server, tmp_path):
    base, folder, log, _ = server
    rparis_fixture(folder)
    first = dl.DATASETS["rparis6k"][0]
    data = (folder / urlparse(first.url).path.lstrip("/")).read_bytes()
    root = tmp_path / "data"
    part = root / (first.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:1000])
    dl.download("rparis6k", root, base_url=base)
    path, rng, sent = log[0]
    assert path.endswith("paris_1-v1.tgz") and rng == "bytes=1000-" and sent == len(data) - 1000
    assert (root / "rparis6k" / "jpg" / "paris_louvre_000001.jpg").read_bytes() == random.Random(0).randbytes(3000)


def test_server_without_range_support_restarts_the_file(server, tmp_path):
    base, folder, log, httpd = server
    httpd.ranges = False
    rparis_fixture(folder)
    first = dl.DATASETS["rparis6k"][0]
    data = (folder / urlparse(first.url).path.lstrip("/")).read_bytes()
    part = tmp_path / "data" / (first.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(b"stale bytes")
    dl.download("rparis6k", tmp_path / "data", base_url=base, progress=True)
    assert log[0][2] == len(data)
    assert (tmp_path / "data" / "rparis6k" / "jpg" / "paris_louvre_000001.jpg").read_bytes() == random.Random(0).randbytes(3000)


def test_published_sha256_prefix_is_checked(server, tmp_path, monkeypatch):
    base, folder, _, _ = server
    (remote,) = dl.DATASETS["vgg16-gem"]
    payload = b"not really a checkpoint"
    serve(folder, remote.url, payload)
    good = hashlib.sha256(payload).hexdigest()[:7]
    monkeypatch.setitem(dl.DATASETS, "vgg16-gem", [dl.Remote(remote.url, remote.path, sha256=good)])
    out = dl.download("vgg16-gem", tmp_path / "data", base_url=base)
    assert (out / Path(remote.path).name).read_bytes() == payload

    monkeypatch.setitem(dl.DATASETS, "vgg16-gem", [dl.Remote(remote.url, "networks/other.pth", sha256="0000000")])
    with pytest.raises(EngineError, match="does not match the published 0000000") as err:
        dl.download("vgg16-gem", tmp_path / "data", base_url=base)
    assert "other.pth.part" in str(err.value)
    assert not (out / "other.pth.part").exists() and not (out / "other.pth").exists()


def test_unknown_checksum_is_locked_at_first_download(server, tmp_path):
    base, folder, _, _ = server
    rparis_fixture(folder)
    gnd_remote = dl.DATASETS["rparis6k"][2]
    root = tmp_path / "data"
    dl.download("rparis6k", root, base_url=base)
    (root / gnd_remote.path).unlink()
    served = folder / urlparse(gnd_remote.url).path.lstrip("/")
    served.write_bytes(served.read_bytes()[::-1])  # same size, other bytes: the server's file changed
    with pytest.raises(EngineError, match="first download's"):
        dl.download("rparis6k", root, base_url=base)
    assert not (root / gnd_remote.path).exists() and not (root / (gnd_remote.path + ".part")).exists()


def test_http_error_names_the_url(server, tmp_path):
    base, _, _, _ = server
    with pytest.raises(EngineError, match="HTTP 404 .*gnd_roxford5k.pkl|HTTP 404 .*oxbuild_images-v1.tgz"):
        dl.download("roxford5k", tmp_path / "data", base_url=base)


def test_unsafe_archive_is_refused(server, tmp_path):
    base, folder, _, _ = server
    rparis_fixture(folder)
    serve(folder, dl.DATASETS["rparis6k"][0].url, tgz({"../escape.jpg": b"x"}))
    with pytest.raises(EngineError, match="unexpected archive content.*outside.*archive deleted"):
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    out = tmp_path / "data" / "rparis6k"
    assert not (out / "escape.jpg").exists() and not (out / "paris_1-v1.tgz").exists()
    assert "rparis6k/paris_1-v1.tgz" not in json.loads((out / dl.LOCK).read_text())  # refetched afresh next time


def test_disk_full_is_reported_before_downloading(server, tmp_path, monkeypatch):
    base, folder, log, _ = server
    rparis_fixture(folder)
    monkeypatch.setattr(dl.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 10, 10))
    with pytest.raises(EngineError, match="disk full: .* bytes to download, 10 free"):
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert not list((tmp_path / "data" / "rparis6k").iterdir())  # not even a .part was started


def test_flatten_refuses_two_files_with_one_name(server, tmp_path):
    base, folder, _, _ = server
    rparis_fixture(folder)
    serve(folder, dl.DATASETS["rparis6k"][0].url, tgz({"a/x.jpg": b"1", "b/x.jpg": b"2"}))
    with pytest.raises(EngineError, match="two files named 'x.jpg'"):
        dl.download("rparis6k", tmp_path / "data", base_url=base)


def test_kept_files_are_checked_again_on_every_run(server, tmp_path):
    base, folder, log, _ = server
    rparis_fixture(folder)
    root = tmp_path / "data"
    dl.download("rparis6k", root, base_url=base)
    marker = json.loads((root / "rparis6k" / "paris_1-v1.tgz.unpacked").read_text())
    lock = json.loads((root / "rparis6k" / dl.LOCK).read_text())
    assert marker == {"files": 2, "sha256": lock["rparis6k/paris_1-v1.tgz"]["sha256"]}
    gnd = root / "rparis6k" / "gnd_rparis6k.pkl"
    gnd.write_bytes(gnd.read_bytes()[:-1] + b"!")  # changed after it was verified (by hand, or by anyone)
    requests = len(log)
    with pytest.raises(EngineError, match=r"gnd_rparis6k.pkl: sha256 .* does not match the first download's .* "
                                          r"the file changed since it was verified"):
        dl.download("rparis6k", root, base_url=base)
    assert len(log) == requests  # nothing fetched, nothing replaced silently
    gnd.unlink()
    dl.download("rparis6k", root, base_url=base)
    assert pickle.loads(gnd.read_bytes())["qimlist"] == ["paris_louvre_000003"]


def test_pinned_checksums(server, tmp_path):
    base, folder, _, _ = server
    rparis_fixture(folder)
    served = (folder / urlparse(dl.DATASETS["rparis6k"][2].url).path.lstrip("/")).read_bytes()
    good = hashlib.sha256(served).hexdigest()
    root = tmp_path / "data"
    with pytest.raises(EngineError, match="does not match the pinned " + "0" * 64):
        dl.download("rparis6k", root, base_url=base, pins={"gnd_rparis6k.pkl": "0" * 64})
    assert not (root / "rparis6k" / "gnd_rparis6k.pkl").exists()
    dl.download("rparis6k", root, base_url=base, pins=dl.parse_pins([f"gnd_rparis6k.pkl={good.upper()}"]))
    assert (root / "rparis6k" / "gnd_rparis6k.pkl").read_bytes() == served
    dl.download("rparis6k", root, base_url=base, pins={"rparis6k/gnd_rparis6k.pkl": good})  # by path too
    with pytest.raises(EngineError, match="pinned checksum for 'gnd_roxford5k.pkl', which is no file of this dataset"):
        dl.download("rparis6k", root, base_url=base, pins={"gnd_roxford5k.pkl": good})
    for bad in ("gnd_rparis6k.pkl", "gnd_rparis6k.pkl=abc", "=" + good, f"x={good}0"):
        with pytest.raises(EngineError, match="FILE=SHA256"):
            dl.parse_pins([bad])


def test_sources_are_https_and_no_digest_is_invented():
    urls = [r.url for remotes in dl.DATASETS.values() for r in remotes]
    own = [u for u in urls if "/networks/" not in u]  # the teachers' base URL lives in engine/cirtorch.py
    assert own and all(u.startswith("https://") for u in own)
    published = {r.path: r.sha256 for remotes in dl.DATASETS.values() for r in remotes if r.sha256 != dl.UNKNOWN}
    assert published == {"networks/retrievalSfM120k-resnet101-gem-b80fb85.pth": "b80fb85",
                         "networks/retrievalSfM120k-vgg16-gem-b4dcdc6.pth": "b4dcdc6"}  # the names' own prefixes


def test_registry_covers_the_published_files():
    assert set(dl.DATASETS) == {"roxford5k", "rparis6k", "sfm120k", "r1m", "resnet101-gem", "vgg16-gem"}
    assert len([r for r in dl.DATASETS["r1m"] if r.unpack_to]) == 100
    assert dl.DATASETS["resnet101-gem"][0].sha256 == "b80fb85"
    assert dl.mirror_url("http://host.org/a/b.tgz", "http://127.0.0.1:9/m/") == "http://127.0.0.1:9/m/a/b.tgz"
    with pytest.raises(EngineError, match="unknown dataset"):
        dl.download("oxford105k", "/nonexistent")


def test_command_line_pins(server, tmp_path, run_cli):
    base, folder, _, _ = server
    rparis_fixture(folder)
    root = tmp_path / "data"
    code, _, err = run_cli("data", "download", "rparis6k", "--root", root, "--base-url", base, "--sha256", "gnd_rparis6k.pkl=" + "0" * 64)
    assert code == EXIT_INPUT and err.count("\n") == 1 and "gnd_rparis6k.pkl" in err and "pinned" in err
    assert not (root / "rparis6k" / "gnd_rparis6k.pkl").exists()
    code, _, err = run_cli("data", "download", "rparis6k", "--root", root, "--base-url", base, "--sha256", "gnd_rparis6k.pkl=xyz")
    assert code == EXIT_INPUT and "FILE=SHA256" in err
