"""Resumable, checksummed downloads of the public benchmarks and teachers, unpacked into one layout.

Layout under `root` (see FORMATS.md):
  roxford5k/jpg/*.jpg + roxford5k/gnd_roxford5k.pkl
  rparis6k/jpg/*.jpg  + rparis6k/gnd_rparis6k.pkl          (the archives' nested folders flattened)
  sfm120k/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid> + sfm120k/dbs/retrieval-SfM-120k{,-whiten}.pkl
  revisitop1m/jpg/... + revisitop1m/revisitop1m.txt          (the archives' own paths, as revisitop unpacks them)
  networks/<cirtorch file>.pth
Each dataset folder holds `checksums.lock.json` ({path: {url, size, sha256}}): every verified download is
recorded there, and a later download of the same path must match it (the only check where no checksum is
published). An archive is unpacked, then `<archive>.unpacked` is written and the archive deleted, so a rerun
skips every finished step and touches no network.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..cirtorch import BASE_URL as CIRTORCH_URL
from ..cirtorch import CIRTORCH_TEACHERS
from ..errors import EngineError

UNKNOWN = "unknown"
LOCK = "checksums.lock.json"
CHUNK = 1 << 20
RETRIES = 3  # resumptions after a dropped connection before giving up (the .part file stays for a rerun)
TIMEOUT_S = 60


@dataclass(frozen=True)
class Remote:
    """One published file.

    url: where it is published. path: where the complete file lands, relative to the root.
    sha256: full hex digest, a hex prefix (cirtorch names end in one), or UNKNOWN (then the lock file decides).
    unpack_to: for a .tar.gz/.tgz, the folder (relative to the root) it unpacks into; None keeps the file.
    flatten: put every file of the archive directly in unpack_to (the Paris archives nest per landmark).
    """

    url: str
    path: str
    sha256: str = UNKNOWN
    unpack_to: str | None = None
    flatten: bool = False


_OXFORD = "https://www.robots.ox.ac.uk/~vgg/data/"
_REVISITOP = "http://cmp.felk.cvut.cz/revisitop/data/datasets/"
_SFM = "http://cmp.felk.cvut.cz/cnnimageretrieval/data/train/"
_R1M = "http://ptak.felk.cvut.cz/revisitop/revisitop1m/"

DATASETS: dict[str, list[Remote]] = {
    "roxford5k": [
        Remote(_OXFORD + "oxbuildings/oxbuild_images-v1.tgz", "roxford5k/oxbuild_images-v1.tgz", unpack_to="roxford5k/jpg", flatten=True),
        Remote(_REVISITOP + "roxford5k/gnd_roxford5k.pkl", "roxford5k/gnd_roxford5k.pkl"),
    ],
    "rparis6k": [
        Remote(_OXFORD + "parisbuildings/paris_1-v1.tgz", "rparis6k/paris_1-v1.tgz", unpack_to="rparis6k/jpg", flatten=True),
        Remote(_OXFORD + "parisbuildings/paris_2-v1.tgz", "rparis6k/paris_2-v1.tgz", unpack_to="rparis6k/jpg", flatten=True),
        Remote(_REVISITOP + "rparis6k/gnd_rparis6k.pkl", "rparis6k/gnd_rparis6k.pkl"),
    ],
    "sfm120k": [
        Remote(_SFM + "ims/ims.tar.gz", "sfm120k/ims.tar.gz", unpack_to="sfm120k/ims"),
        Remote(_SFM + "dbs/retrieval-SfM-120k.pkl", "sfm120k/dbs/retrieval-SfM-120k.pkl"),
        Remote(_SFM + "dbs/retrieval-SfM-120k-whiten.pkl", "sfm120k/dbs/retrieval-SfM-120k-whiten.pkl"),
    ],
    "r1m": [
        Remote(_R1M + "revisitop1m.txt", "revisitop1m/revisitop1m.txt"),
        *(Remote(_R1M + f"jpg/revisitop1m.{i}.tar.gz", f"revisitop1m/revisitop1m.{i}.tar.gz", unpack_to="revisitop1m/jpg")
          for i in range(1, 101)),
    ],
    **{name: [Remote(CIRTORCH_URL + t["file"], f"networks/{t['file']}", sha256=t["sha256_prefix"])]
       for name, t in CIRTORCH_TEACHERS.items()},
}


def download(name: str, root: str | Path, base_url: str | None = None, progress: bool | None = None) -> Path:
    """Fetch, verify and unpack every file of DATASETS[name] under `root`; returns the dataset's folder.

    base_url: a mirror that keeps the original URL paths (`<base_url>/<path of the url>`), e.g. a local server.
    progress: show rich progress bars; None shows them only when stderr is a terminal.
    Finished steps (files in place, archives with their `.unpacked` marker) are skipped without any request.
    """
    if name not in DATASETS:
        raise EngineError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    root = Path(root)
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console,
                  disable=not (console.is_terminal if progress is None else progress)) as bar:
        for remote in DATASETS[name]:
            fetch_remote(remote, root, mirror_url(remote.url, base_url), bar)
    return root / PurePosixPath(DATASETS[name][0].path).parts[0]


def mirror_url(url: str, base_url: str | None) -> str:
    """`url` itself, or the same path on the mirror `base_url` (scheme://host[:port][/prefix])."""
    return url if base_url is None else base_url.rstrip("/") + urlparse(url).path


def fetch_remote(remote: Remote, root: Path, url: str, bar: Progress) -> None:
    """Download `remote` from `url` into place (verified, recorded in the lock file) and unpack it if it is an archive."""
    dest = root / remote.path
    lock_path = root / PurePosixPath(remote.path).parts[0] / LOCK
    if remote.unpack_to is not None:
        marker = dest.with_name(dest.name + ".unpacked")
        if marker.exists():
            dest.unlink(missing_ok=True)  # a run stopped between writing the marker and deleting the archive
            return
    if not dest.exists():
        fetch(url, dest, remote.sha256, lock_path, remote.path, bar)
    if remote.unpack_to is not None:
        try:
            count = unpack(dest, root / remote.unpack_to, remote.flatten)
        except EngineError as e:  # an unusable archive: forget it, so a rerun fetches (and records) it afresh
            dest.unlink()
            update_lock(lock_path, remote.path, None)
            raise EngineError(f"{e} (archive deleted; rerun to download it again)") from None
        marker.write_text(json.dumps({"files": count}) + "\n")
        dest.unlink()


def fetch(url: str, dest: Path, sha256: str, lock_path: Path, key: str, bar: Progress) -> None:
    """Download `url` to `dest` through `dest.part`, resuming a partial `.part` with an HTTP Range request.

    The complete file must have the server's announced size and match `sha256` (full digest or prefix) and
    the lock file's record of `key`; then it is recorded there and renamed into place. A mismatching file is
    deleted and named in the EngineError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    locked = read_lock(lock_path).get(key)
    task = bar.add_task(dest.name, total=None)
    for _ in range(RETRIES + 1):
        total = _transfer(url, part, locked["size"] if locked else None, lock_path, bar, task)
        if part.stat().st_size == total:
            break
    else:
        raise EngineError(f"download stopped at {part.stat().st_size} of {total} bytes from {url}: rerun to resume", part)
    digest = sha256_file(part)
    expected = sha256 if sha256 != UNKNOWN else (locked or {}).get("sha256", UNKNOWN)
    if expected != UNKNOWN and not digest.startswith(expected.lower()):
        part.unlink()
        where = "published" if sha256 != UNKNOWN else f"first download's (recorded in {lock_path})"
        raise EngineError(f"sha256 {digest[:16]}... does not match the {where} {expected}; "
                          f"deleted the bad download of {url}, rerun to fetch it again", part)
    update_lock(lock_path, key, {"url": url, "size": total, "sha256": digest})
    os.replace(part, dest)


def _transfer(url: str, part: Path, locked_size: int | None, lock_path: Path, bar: Progress, task) -> int:
    """Append the missing bytes of `url` to `part`; returns the file's total size as the server states it."""
    have = part.stat().st_size if part.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing after `have`: the part is complete (or too long: start over)
            if locked_size is None or locked_size == have:
                return have
            part.unlink()
            return _transfer(url, part, locked_size, lock_path, bar, task)
        raise EngineError(f"HTTP {e.code} {e.reason} for {url}", part) from None
    except (urllib.error.URLError, OSError) as e:
        raise EngineError(f"cannot download {url}: {getattr(e, 'reason', e)}", part) from None
    with response:
        if response.status == 206:
            total = int(response.headers["Content-Range"].rsplit("/", 1)[1])
        else:  # the server ignored the Range header: start from the beginning
            have = 0
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
        if locked_size is not None and total is not None and total != locked_size:
            raise EngineError(f"{url} is {total} bytes now but was {locked_size} at the first download "
                              f"(recorded in {lock_path}); delete that entry if the new file is intended", part)
        _check_space(part, (total or 0) - have)
        bar.update(task, total=total, completed=have)
        try:
            with open(part, "ab" if have else "wb") as f:
                while chunk := response.read(CHUNK):
                    f.write(chunk)
                    bar.advance(task, len(chunk))
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise EngineError("disk full while downloading: free space and rerun to resume", part) from None
            raise EngineError(f"download of {url} broke off ({e}): rerun to resume", part) from None
    return total if total is not None else part.stat().st_size


def _check_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise EngineError(f"disk full: {needed} bytes to download, {free} free", path.parent)


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


def read_lock(lock_path: Path) -> dict:
    """The lock file's records {path: {url, size, sha256}}; empty when there is none yet."""
    if not lock_path.exists():
        return {}
    try:
        records = json.loads(lock_path.read_text())
    except ValueError as e:
        raise EngineError(f"lock file is not valid JSON ({e})", lock_path) from None
    if not isinstance(records, dict):
        raise EngineError("lock file must hold a JSON object {path: {url, size, sha256}}", lock_path)
    return records


def update_lock(lock_path: Path, key: str, record: dict | None) -> None:
    """Add, replace or (record None) remove one record, writing the lock file through a temporary name."""
    records = read_lock(lock_path)
    if record is None:
        records.pop(key, None)
    else:
        records[key] = record
    tmp = lock_path.with_name(lock_path.name + ".tmp")
    tmp.write_text(json.dumps(records, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, lock_path)


def unpack(archive: Path, dest: Path, flatten: bool) -> int:
    """Extract the regular files of a .tar.gz/.tgz into `dest`; returns how many were written.

    flatten: each file goes to `dest/<its base name>` (two files with one name are an error); otherwise the
    archive's relative paths are kept. Links, devices, absolute paths and `..` are refused as unexpected content.
    Files already there are overwritten, so an interrupted unpack simply runs again.
    """
    dest.mkdir(parents=True, exist_ok=True)
    seen: set[str] = set()
    try:
        with tarfile.open(archive, "r|*") as tar:  # streaming: archives of many GB are read once, in order
            for member in tar:
                if member.isdir():
                    continue
                rel = _member_path(member, archive)
                target = dest / (rel.name if flatten else rel)
                if flatten and rel.name in seen:
                    raise EngineError(f"unexpected archive content: two files named {rel.name!r}", archive)
                seen.add(rel.name if flatten else str(rel))
                target.parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(target, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise EngineError("disk full while unpacking: free space and rerun", dest) from None
        raise EngineError(f"not a readable tar archive ({type(e).__name__}: {e})", archive) from None
    if not seen:
        raise EngineError("unexpected archive content: no files in it", archive)
    return len(seen)


def _member_path(member: tarfile.TarInfo, archive: Path) -> PurePosixPath:
    """The member's safe relative path, or an EngineError naming the archive and the member."""
    rel = PurePosixPath(member.name)
    if not member.isfile():
        raise EngineError(f"unexpected archive content: {member.name!r} is a link or special file", archive)
    if rel.is_absolute() or ".." in rel.parts:
        raise EngineError(f"unexpected archive content: {member.name!r} points outside the folder", archive)
    return PurePosixPath(*[p for p in rel.parts if p != "."])
