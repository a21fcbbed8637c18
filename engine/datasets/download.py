"""Resumable, checksummed downloads of the public benchmarks and teachers, unpacked into one layout.

Layout under `root` (see FORMATS.md):
  roxford5k/jpg/*.jpg + roxford5k/gnd_roxford5k.pkl
  rparis6k/jpg/*.jpg  + rparis6k/gnd_rparis6k.pkl          (the archives' nested folders flattened)
  sfm120k/ims/<cid[-2:]>/<cid[-4:-2]>/<cid[-6:-4]>/<cid> + sfm120k/dbs/retrieval-SfM-120k{,-whiten}.pkl
  revisitop1m/jpg/... + revisitop1m/revisitop1m.txt          (the archives' own paths, as revisitop unpacks them)
  networks/<cirtorch file>.pth
Every source is fetched over https (a `base_url` mirror may be plain http, e.g. a local server).

Checksums. A file must match every digest known for it: the published one (`Remote.sha256`: only the
cirtorch teachers publish one, as the sha256 prefix in their names), one the caller pins (`pins`), and
the one recorded in the dataset's `checksums.lock.json` ({path: {url, size, sha256}}) at its first
verified download ("trust on first use"); a kept file is checked against them again on every later run.
No other digest is pinned in this module: none could be computed from the real servers here, and an
invented one would only refuse the real file. A pickle that passes is still read as plain data only
(engine.pickles).

Archives are extracted into a staging folder beside their destination, every member checked (regular
files and folders only, inside the folder), and moved into place only when the whole archive has been
read; then `<archive>.unpacked` is written and the archive deleted, so a rerun skips every finished step
and touches no network, and a refused or broken archive leaves nothing behind.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tarfile
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

from rich.console import Console
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

from ..cirtorch import BASE_URL as CIRTORCH_URL
from ..cirtorch import CIRTORCH_TEACHERS
from ..errors import EngineError
from ..files import sha256_file, write_text

UNKNOWN = "unknown"
LOCK = "checksums.lock.json"
CHUNK = 1 << 20
RETRIES = 3  # resumptions after a dropped connection before giving up (the .part file stays for a rerun)
TIMEOUT_S = 60
_SHA256 = re.compile(r"[0-9a-f]{64}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+)", re.ASCII)


class DownloadWarning(UserWarning):
    """A download that goes on differently than asked (e.g. restarted from the first byte)."""


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
_REVISITOP = "https://cmp.felk.cvut.cz/revisitop/data/datasets/"
_SFM = "https://cmp.felk.cvut.cz/cnnimageretrieval/data/train/"
_R1M = "https://ptak.felk.cvut.cz/revisitop/revisitop1m/"

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


def download(name: str, root: str | Path, base_url: str | None = None, progress: bool | None = None,
             pins: Mapping[str, str] | None = None) -> Path:
    """Fetch, verify and unpack every file of DATASETS[name] under `root`; returns the dataset's folder.

    base_url: a mirror that keeps the original URL paths (`<base_url>/<path of the url>`), e.g. a local server.
    progress: show rich progress bars; None shows them only when stderr is a terminal.
    pins: {file name or path under root: full hex sha256} the caller vouches for (see `parse_pins`); a pin
    replaces the lock file's record of that file. Finished steps (files in place and matching their
    checksums, archives with their `.unpacked` marker) are skipped without any request.
    """
    if name not in DATASETS:
        raise EngineError(f"unknown dataset {name!r} (known: {', '.join(DATASETS)})")
    root = Path(root)
    pinned = _pins_by_path(DATASETS[name], pins or {})
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=console,
                  disable=not (console.is_terminal if progress is None else progress)) as bar:
        for remote in DATASETS[name]:
            fetch_remote(remote, root, mirror_url(remote.url, base_url), bar, pinned.get(remote.path))
    return root / PurePosixPath(DATASETS[name][0].path).parts[0]


def parse_pins(texts: list[str]) -> dict[str, str]:
    """`NAME=SHA256` strings (as a command line gives them) -> {NAME: sha256}; an EngineError for a malformed one."""
    pins = {}
    for text in texts:
        name, _, digest = text.partition("=")
        if not name or not _SHA256.fullmatch(digest.strip().lower()):
            raise EngineError(f"a pinned checksum is FILE=SHA256 (64 hex digits), got {text!r}")
        pins[name.strip()] = digest.strip().lower()
    return pins


def _pins_by_path(remotes: list[Remote], pins: Mapping[str, str]) -> dict[str, str]:
    """The caller's pins keyed by each remote's path; names that are no file of the dataset are refused."""
    by_name = {PurePosixPath(r.path).name: r.path for r in remotes} | {r.path: r.path for r in remotes}
    unknown = [n for n in pins if n not in by_name]
    if unknown:
        raise EngineError(f"pinned checksum for {unknown[0]!r}, which is no file of this dataset "
                          f"(its files: {', '.join(PurePosixPath(r.path).name for r in remotes[:4])}...)")
    for digest in pins.values():
        if not _SHA256.fullmatch(digest):
            raise EngineError(f"a pinned checksum must be 64 lower-case hex digits, got {digest!r}")
    return {by_name[n]: d for n, d in pins.items()}


def mirror_url(url: str, base_url: str | None) -> str:
    """`url` itself, or the same path on the mirror `base_url` (scheme://host[:port][/prefix])."""
    return url if base_url is None else base_url.rstrip("/") + urlparse(url).path


def fetch_remote(remote: Remote, root: Path, url: str, bar: Progress, pin: str | None = None) -> None:
    """Download `remote` from `url` into place (verified, recorded in the lock file) and unpack it if it is an archive.

    pin: a full sha256 the caller vouches for (it replaces the lock file's record). A file already in place
    is checked against its checksums instead of being fetched again.
    """
    dest = root / remote.path
    lock_path = root / PurePosixPath(remote.path).parts[0] / LOCK
    if remote.unpack_to is not None:
        marker = dest.with_name(dest.name + ".unpacked")
        if marker.exists():
            dest.unlink(missing_ok=True)  # a run stopped between writing the marker and deleting the archive
            return
    if dest.exists():
        verify_kept(dest, remote, url, lock_path, pin)
    else:
        fetch(url, dest, remote.sha256, lock_path, remote.path, bar, pin)
    if remote.unpack_to is not None:
        try:
            count = unpack(dest, root / remote.unpack_to, remote.flatten)
        except EngineError as e:  # an unusable archive: forget it, so a rerun fetches (and records) it afresh
            dest.unlink()
            update_lock(lock_path, remote.path, None)
            raise EngineError(f"{e} (archive deleted, nothing unpacked; rerun to download it again)") from None
        digest = read_lock(lock_path).get(remote.path, {}).get("sha256")
        write_text(marker, json.dumps({"files": count, "sha256": digest}) + "\n")
        dest.unlink()


def _expected(published: str, pin: str | None, record: dict | None, lock_path: Path) -> list[tuple[str, str]]:
    """(where it comes from, hex digest or prefix) of every checksum a file must match."""
    expected = [] if published == UNKNOWN else [("published", published.lower())]
    if pin is not None:
        expected.append(("pinned", pin))
    elif record and record.get("sha256"):
        expected.append((f"first download's (recorded in {lock_path})", str(record["sha256"])))
    return expected


def verify_kept(dest: Path, remote: Remote, url: str, lock_path: Path, pin: str | None) -> None:
    """Check a file already in place against its checksums (recording it when it has none yet)."""
    record = read_lock(lock_path).get(remote.path)
    digest = sha256_file(dest)
    for where, want in _expected(remote.sha256, pin, record, lock_path):
        if not digest.startswith(want):
            raise EngineError(f"sha256 {digest[:16]}... does not match the {where} {want}: the file changed since "
                              f"it was verified; delete it (and its lock record) to download it again", dest)
    if record is None or record.get("sha256") != digest:
        update_lock(lock_path, remote.path, {"url": url, "size": dest.stat().st_size, "sha256": digest})


def fetch(url: str, dest: Path, sha256: str, lock_path: Path, key: str, bar: Progress, pin: str | None = None) -> None:
    """Download `url` to `dest` through `dest.part`, resuming a partial `.part` with an HTTP Range request.

    The complete file must have the server's announced size and match `sha256` (published: full digest or
    prefix), `pin` (the caller's) or else the lock file's record of `key`; then it is recorded there and
    renamed into place. A mismatching file is deleted and named in the EngineError.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    locked = read_lock(lock_path).get(key)
    locked_size = locked.get("size") if locked and pin is None else None  # a pin vouches for a changed file
    task = bar.add_task(dest.name, total=None)
    for _ in range(RETRIES + 1):
        total = _transfer(url, part, locked_size, lock_path, bar, task)
        if part.stat().st_size == total:
            break
    else:
        raise EngineError(f"download stopped at {part.stat().st_size} of {total} bytes from {url}: rerun to resume", part)
    digest = sha256_file(part)
    for where, expected in _expected(sha256, pin, locked, lock_path):
        if not digest.startswith(expected):
            part.unlink()
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
            header = response.headers.get("Content-Range")
            total = _resumed_total(header, have)
            if total is None:
                if not have:
                    raise EngineError(f"{url} answered a request for the whole file with Content-Range {header!r}", part)
                # another range than asked for, or no readable one: the bytes cannot be placed, so start over
                warnings.warn(f"{part}: the server answered the resume at byte {have} with Content-Range {header!r}; "
                              f"downloading {url} from the start", DownloadWarning, stacklevel=2)
                response.close()
                part.unlink()
                return _transfer(url, part, locked_size, lock_path, bar, task)
        else:  # the server ignored the Range header: start from the beginning
            have = 0
            length = (response.headers.get("Content-Length") or "").strip()
            total = int(length) if re.fullmatch(r"\d+", length, re.ASCII) else None  # unknown: the checksums decide
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


def _resumed_total(header: str | None, have: int) -> int | None:
    """The file's total size from a 206's `Content-Range: bytes START-END/TOTAL`, or None when the header is
    missing, malformed, or does not start at `have` (the bytes we asked for)."""
    m = _CONTENT_RANGE.fullmatch((header or "").strip())
    if m is None:
        return None
    start, end, total = map(int, m.groups())
    return total if start == have and start <= end < total else None


def _check_space(path: Path, needed: int) -> None:
    free = shutil.disk_usage(path.parent).free
    if needed > free:
        raise EngineError(f"disk full: {needed} bytes to download, {free} free", path.parent)


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
    write_text(lock_path, json.dumps(records, indent=1, sort_keys=True) + "\n")


def unpack(archive: Path, dest: Path, flatten: bool) -> int:
    """Extract the regular files of a .tar.gz/.tgz into `dest`; returns how many were written.

    flatten: each file goes to `dest/<its base name>` (two files with one name are an error); otherwise the
    archive's relative paths are kept. Everything is first extracted into a staging folder beside `dest`
    and moved into `dest` (one rename when `dest` is new, else a rename per file) only once the whole archive
    has been read and every member passed: regular files and folders inside the folder, nothing else (links,
    devices, absolute paths and `..` are refused as unexpected content, and tarfile's "data" filter checks
    each member too). A refused or broken archive leaves `dest` as it was; files already there are
    overwritten, so an interrupted move simply runs again.
    """
    staging = dest.parent / f".{dest.name}.{archive.name}.unpacking"
    shutil.rmtree(staging, ignore_errors=True)  # left by an interrupted run
    staging.mkdir(parents=True)
    try:
        files = _extract(archive, staging, flatten)
        try:
            if not dest.exists():
                os.replace(staging, dest)
            else:
                for rel in files:
                    (dest / rel).parent.mkdir(parents=True, exist_ok=True)
                    os.replace(staging / rel, dest / rel)
        except OSError as e:
            raise EngineError(f"cannot move the unpacked files into place ({e.strerror or e})", dest) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return len(files)


def _extract(archive: Path, staging: Path, flatten: bool) -> list[PurePosixPath]:
    """Every regular file of `archive` written under `staging`; returns their paths relative to it."""
    files: dict[PurePosixPath, None] = {}  # in archive order, each once
    try:
        with tarfile.open(archive, "r|*") as tar:  # streaming: archives of many GB are read once, in order
            for member in tar:
                rel = _member_path(member, archive, staging)
                if member.isdir():
                    continue
                rel = PurePosixPath(rel.name) if flatten else rel
                if flatten and rel in files:
                    raise EngineError(f"unexpected archive content: two files named {rel.name!r}", archive)
                files[rel] = None
                (staging / rel).parent.mkdir(parents=True, exist_ok=True)
                with tar.extractfile(member) as src, open(staging / rel, "wb") as out:
                    shutil.copyfileobj(src, out, CHUNK)
    except (tarfile.TarError, EOFError, zlib.error, OSError, ValueError) as e:
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise EngineError("disk full while unpacking: free space and rerun", staging.parent) from None
        raise EngineError(f"not a readable tar archive ({type(e).__name__}: {e})".splitlines()[0], archive) from None
    if not files:
        raise EngineError("unexpected archive content: no files in it", archive)
    return list(files)


def _member_path(member: tarfile.TarInfo, archive: Path, staging: Path) -> PurePosixPath:
    """The member's safe relative path (a regular file or a folder), or an EngineError naming the archive and member."""
    rel = PurePosixPath(member.name)
    if not (member.isfile() or member.isdir()):
        raise EngineError(f"unexpected archive content: {member.name!r} is a link or special file", archive)
    if rel.is_absolute() or ".." in rel.parts or "\x00" in member.name:
        raise EngineError(f"unexpected archive content: {member.name!r} points outside the folder", archive)
    data_filter = getattr(tarfile, "data_filter", None)  # Python >= 3.11.4 / 3.12: the same checks, kept current
    if data_filter is not None:
        try:
            data_filter(member, str(staging))
        except tarfile.FilterError as e:
            raise EngineError(f"unexpected archive content: {e}", archive) from None
    rel = PurePosixPath(*[p for p in rel.parts if p != "."])
    if not rel.parts and member.isfile():
        raise EngineError(f"unexpected archive content: a file without a name ({member.name!r})", archive)
    return rel
