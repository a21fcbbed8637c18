"""Data from elsewhere: decompression bombs in every command that decodes images, hostile or broken archives
(nothing extracted is left behind, no completion marker), and a server's malformed Content-Range on resume."""
import io
import json
import pickle
import random
import shutil
import struct
import tarfile
import zlib

import numpy as np
import pytest
from PIL import Image

from engine.datasets import download as dl
from engine.errors import EXIT_INPUT, EngineError
from engine.images import MAX_PIXELS, read_image
from test_download import serve, server  # noqa: F401  (the local mirror fixture)

pytestmark = pytest.mark.faults


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height 8-bit RGB pixels, followed by a few bytes of image data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


# 10^10 pixels: refused by Pillow's own check inside Image.open; 1.1 x 10^8: passes Pillow's, refused by MAX_PIXELS
BOMBS = {"huge": (100_000, 100_000), "over_limit": (11_000, 10_000)}


@pytest.mark.parametrize("size", BOMBS.values(), ids=BOMBS.keys())
def test_bomb_is_refused_before_decoding(tmp_path, size):
    assert size[0] * size[1] > MAX_PIXELS
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb_png(*size))
    with pytest.raises(EngineError, match=f"over the {MAX_PIXELS} pixel limit") as err:
        read_image(path)
    assert str(err.value).startswith(f"{path}: image header claims") and "\n" not in str(err.value)


def test_encode_names_the_bomb(tmp_path, run_cli):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (64, 48), (20, 90, 160)).save(tmp_path / "imgs" / "fine.jpg")
    (tmp_path / "imgs" / "zz_bomb.png").write_bytes(bomb_png(*BOMBS["huge"]))
    code, _, err = run_cli("encode", "--model", "effnet-lite2-gem", "--images", tmp_path / "imgs", "--out", tmp_path / "q.npy",
                           "--max-side", 64, "--workers", 0)
    assert code == EXIT_INPUT and err.count("\n") == 1 and "zz_bomb.png" in err and "pixel limit" in err
    assert not (tmp_path / "q.npy").exists()


def test_data_views_names_the_bomb_and_writes_nothing(tmp_path, run_cli):
    from skimage import data

    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        Image.fromarray(getattr(data, name)()).save(photos / f"{name}.jpg")
    (photos / "zz_bomb.png").write_bytes(bomb_png(*BOMBS["over_limit"]))
    code, _, err = run_cli("data", "views", "--out", tmp_path / "views", "--photos", photos)
    assert code == EXIT_INPUT and err.count("\n") == 1 and "zz_bomb.png" in err and "pixel limit" in err
    assert not (tmp_path / "views").exists()


def test_report_shows_a_bomb_as_a_named_placeholder(tiny_bench, tmp_path, run_cli):
    shutil.copytree(tiny_bench / "jpg", tmp_path / "jpg")
    gnd = pickle.loads((tiny_bench / "gnd.pkl").read_bytes())
    bomb = tmp_path / "jpg" / f"{gnd['qimlist'][0]}.jpg"  # a PNG bomb under a .jpg name: the content decides
    bomb.write_bytes(bomb_png(*BOMBS["huge"]))
    ids = np.tile(np.arange(len(gnd["imlist"])), (len(gnd["qimlist"]), 1))
    np.savez(tmp_path / "r.npz", ids=ids, scores=-ids.astype(np.float32))
    code, _, err = run_cli("report", "--gnd", tiny_bench / "gnd.pkl", "--results", tmp_path / "r.npz", "--images", tmp_path / "jpg",
                           "--out", tmp_path / "rep", "--top", 3)
    assert code == 0, err
    assert f"1 image(s) missing or unreadable (first: {bomb})" in err and "Traceback" not in err
    assert len(list((tmp_path / "rep" / "thumbs").iterdir())) == len(gnd["qimlist"]) - 1 + 3  # all but the bomb


# ---------------------------------------------------------------- archives

def member(name: str, data: bytes = b"x", kind: bytes = tarfile.REGTYPE, link: str = "") -> tuple:
    return name, data, kind, link


def archive(*members, truncate: int | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data, kind, link in members:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)
    raw = buf.getvalue()
    return raw if truncate is None else raw[:truncate]


GOOD = [member("paris/louvre/paris_louvre_000001.jpg", random.Random(0).randbytes(5000))]
HOSTILE = {
    "dot-dot": [*GOOD, member("paris/../../escape.jpg")],
    "absolute": [*GOOD, member("/tmp/escape.jpg")],
    "symlink out": [*GOOD, member("paris/link", kind=tarfile.SYMTYPE, link="/etc"), member("paris/link/passwd")],
    "symlink in": [*GOOD, member("paris/alias.jpg", kind=tarfile.SYMTYPE, link="louvre/paris_louvre_000001.jpg")],
    "hardlink": [*GOOD, member("paris/hard.jpg", kind=tarfile.LNKTYPE, link="/etc/passwd")],
    "device": [*GOOD, member("paris/null", kind=tarfile.CHRTYPE)],
    "fifo": [*GOOD, member("paris/pipe", kind=tarfile.FIFOTYPE)],
    "no files": [member("paris/", kind=tarfile.DIRTYPE)],
}
MESSAGES = {"dot-dot": "points outside", "absolute": "points outside", "symlink out": "is a link or special file",
            "symlink in": "is a link or special file", "hardlink": "is a link or special file",
            "device": "is a link or special file", "fifo": "is a link or special file", "no files": "no files in it"}


def serve_rparis(httpd, first: bytes, second: bytes | None = None) -> None:
    urls = [r.url for r in dl.DATASETS["rparis6k"]]
    serve(httpd.folder, urls[0], first)
    serve(httpd.folder, urls[1], second if second is not None else archive(member("paris/eiffel/paris_eiffel_000002.jpg", b"e")))
    serve(httpd.folder, urls[2], pickle.dumps({"imlist": [], "qimlist": [], "gnd": []}))


def assert_nothing_left(out, archive_name: str = "paris_1-v1.tgz", kept: tuple = ()) -> None:
    """No file extracted from it (only `kept` in jpg/), no staging folder, no marker, no archive, no lock record of it."""
    assert sorted(p.name for p in (out / "jpg").iterdir()) == list(kept) if (out / "jpg").exists() else not kept
    assert not [p.name for p in out.iterdir() if p.name.endswith(".unpacking")]
    assert not (out / f"{archive_name}.unpacked").exists() and not (out / archive_name).exists()
    assert f"rparis6k/{archive_name}" not in json.loads((out / dl.LOCK).read_text())
    assert not list(out.parent.parent.rglob("escape.jpg"))


@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_archive_leaves_nothing(server, tmp_path, kind):
    base, _, _, httpd = server
    serve_rparis(httpd, archive(*HOSTILE[kind]))
    with pytest.raises(EngineError, match=f"paris_1-v1.tgz: unexpected archive content: .*{MESSAGES[kind]}.*nothing unpacked") as err:
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert "\n" not in str(err.value)
    assert_nothing_left(tmp_path / "data" / "rparis6k")


@pytest.mark.parametrize("cut", [60, 2000, -20], ids=["in the header", "in a member", "in the gzip trailer"])
def test_truncated_archive_leaves_nothing(server, tmp_path, cut):
    base, _, _, httpd = server
    full = archive(*GOOD, member("paris/louvre/paris_louvre_000002.jpg", random.Random(1).randbytes(3000)))
    serve_rparis(httpd, full[:cut])
    with pytest.raises(EngineError, match="paris_1-v1.tgz: not a readable tar archive .*nothing unpacked"):
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert_nothing_left(tmp_path / "data" / "rparis6k")


def test_second_archive_refused_keeps_the_first_whole(server, tmp_path):
    base, _, _, httpd = server
    serve_rparis(httpd, archive(*GOOD), archive(member("paris/eiffel/ok.jpg"), member("paris/eiffel/../../../up.jpg")))
    root = tmp_path / "data"
    with pytest.raises(EngineError, match="paris_2-v1.tgz: unexpected archive content"):
        dl.download("rparis6k", root, base_url=base)
    out = root / "rparis6k"
    assert (out / "paris_1-v1.tgz.unpacked").exists()
    assert_nothing_left(out, "paris_2-v1.tgz", kept=("paris_louvre_000001.jpg",))  # not ok.jpg


def test_staging_left_by_a_killed_unpack_is_cleared(server, tmp_path):
    base, _, _, httpd = server
    serve_rparis(httpd, archive(*GOOD))
    out = tmp_path / "data" / "rparis6k"
    stale = out / ".jpg.paris_1-v1.tgz.unpacking"
    stale.mkdir(parents=True)
    (stale / "half.jpg").write_bytes(b"half")
    dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert sorted(p.name for p in (out / "jpg").iterdir()) == ["paris_eiffel_000002.jpg", "paris_louvre_000001.jpg"]
    assert not stale.exists()


# ---------------------------------------------------------------- Content-Range on resume

@pytest.mark.parametrize("content_range", [
    lambda start, size: None,  # 206 without the header
    lambda start, size: f"bytes */{size}",
    lambda start, size: "bytes=garbage",
    lambda start, size: f"bytes {start}-{size - 1}/*",
    lambda start, size: f"bytes 0-{size - 1}/{size}",  # another range than the one asked for
    lambda start, size: f"bytes {start}-{start - 1}/{size}",  # an empty range
], ids=["missing", "unsatisfied form", "garbage", "unknown total", "other start", "empty"])
def test_malformed_content_range_restarts_from_zero(server, tmp_path, content_range):
    base, _, _, httpd = server
    data = archive(*GOOD)
    serve_rparis(httpd, data)
    first = dl.DATASETS["rparis6k"][0]
    part = tmp_path / "data" / (first.path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:100])
    httpd.content_range = lambda start, size: content_range(start, size) if start else f"bytes 0-{size - 1}/{size}"
    with pytest.warns(dl.DownloadWarning, match="resume at byte 100 with Content-Range .* from the start"):
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert (tmp_path / "data" / "rparis6k" / "jpg" / "paris_louvre_000001.jpg").read_bytes() == GOOD[0][1]
    assert [r for p, r, _ in httpd.log if p.endswith("paris_1-v1.tgz")] == ["bytes=100-", None]


def test_malformed_content_range_on_a_fresh_download_is_one_error(server, tmp_path):
    base, _, _, httpd = server
    serve_rparis(httpd, archive(*GOOD))
    httpd.content_range = lambda start, size: "bytes nonsense"
    with pytest.raises(EngineError, match="answered a request for the whole file with Content-Range 'bytes nonsense'") as err:
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "data" / "rparis6k" / "jpg").exists()


def test_well_formed_but_absurd_total_is_one_error(server, tmp_path):
    base, _, _, httpd = server
    data = archive(*GOOD)
    serve_rparis(httpd, data)
    part = tmp_path / "data" / (dl.DATASETS["rparis6k"][0].path + ".part")
    part.parent.mkdir(parents=True)
    part.write_bytes(data[:100])
    httpd.content_range = lambda start, size: f"bytes {start}-{size - 1}/{10**25}"
    with pytest.raises(EngineError, match=f"disk full: {10**25 - 100} bytes to download") as err:
        dl.download("rparis6k", tmp_path / "data", base_url=base)
    assert "\n" not in str(err.value) and part.read_bytes() == data[:100]  # kept for a resume from a sane server
