"""Users' own data (CSV or JSONL, see FORMATS.md) converted to our formats: an SfM-format db.pkl for
training and a revisited-format gnd.pkl for testing.

Image names in the output are paths relative to `images_root` (default: the folder of the list file),
kept with their extension, so the flat layout finds them as `<images_root>/<name>`.
"""
from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from ..errors import EngineError
from ..pickles import write_pickle

SPLITS = ("train", "val")
LABELS = {"positive": "easy", "easy": "easy", "hard": "hard", "junk": "junk"}
_BBX = ("x1", "y1", "x2", "y2")


def read_records(path: str | Path) -> list[tuple[int, dict]]:
    """Rows of a `.csv` (header line first) or `.jsonl` (one JSON object a line) file as (line number, dict).

    CSV values are strings, an empty cell counts as missing; blank JSONL lines are skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise EngineError("file not found", path)
    suffix = path.suffix.lower()
    with open(path, newline="", encoding="utf-8") as f:
        if suffix == ".csv":
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise EngineError("CSV file has no header line", path)
            return [(reader.line_num, {k.strip(): v.strip() for k, v in row.items() if k and v and v.strip()})
                    for row in reader]
        if suffix == ".jsonl":
            rows = []
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError as e:
                    raise EngineError(f"line {n}: not valid JSON ({e})", path) from None
                if not isinstance(row, dict):
                    raise EngineError(f"line {n}: each line must be a JSON object", path)
                rows.append((n, {k: v for k, v in row.items() if v is not None and v != ""}))
            return rows
    raise EngineError("list files must end in .csv or .jsonl", path)


def convert_training(images_file: str | Path, out_path: str | Path, pairs_file: str | Path | None = None,
                     images_root: str | Path | None = None, seed: int = 0, check_images: bool = True) -> dict:
    """Write an SfM-format db pickle {'train'|'val': {'cids', 'cluster', 'qidxs', 'pidxs'}} from a list of images.

    images_file rows: path, instance (any id; images of one instance match), optional split ('train' default, or 'val').
    pairs_file rows (optional): query, positive (paths as in images_file, same instance and split). Without it each
    image of an instance with two or more images is a query once, its positive another image of that instance
    drawn with `seed`. Cluster ids number the instances in order of first appearance.
    Returns a summary: {'db', 'images_root', 'train'|'val': {'images', 'clusters', 'pairs'}}.
    """
    images_file, out_path = Path(images_file), Path(out_path)
    root = Path(images_root) if images_root is not None else images_file.parent
    rows = read_records(images_file)
    cluster_of: dict[str, int] = {}
    names = {s: [] for s in SPLITS}
    clusters = {s: [] for s in SPLITS}
    where: dict[str, tuple[str, int]] = {}  # name -> (split, index)
    for n, row in rows:
        name = _image_name(_field(row, "path", images_file, n), root, images_file, n, check_images)
        instance = str(_field(row, "instance", images_file, n))
        split = str(row.get("split", "train"))
        if split not in SPLITS:
            raise EngineError(f"line {n}: split must be 'train' or 'val', got {split!r}", images_file)
        if name in where:
            raise EngineError(f"line {n}: image {name!r} is listed twice", images_file)
        where[name] = (split, len(names[split]))
        names[split].append(name)
        clusters[split].append(cluster_of.setdefault(instance, len(cluster_of)))
    if not where:
        raise EngineError("no images listed", images_file)
    if pairs_file is not None:
        pairs = _read_pairs(Path(pairs_file), root, where, clusters)
    else:
        rng = np.random.default_rng(seed)
        pairs = {s: _sample_pairs(clusters[s], rng) for s in SPLITS}
    db = {s: {"cids": names[s], "cluster": clusters[s], "qidxs": [q for q, _ in pairs[s]],
              "pidxs": [p for _, p in pairs[s]]} for s in SPLITS}
    write_pickle(db, out_path)
    return {"db": str(out_path), "images_root": str(root),
            **{s: {"images": len(names[s]), "clusters": len(set(clusters[s])), "pairs": len(pairs[s])} for s in SPLITS}}


def convert_test(gallery_file: str | Path, queries_file: str | Path, labels_file: str | Path, out_path: str | Path,
                 images_root: str | Path | None = None, check_images: bool = True) -> dict:
    """Write a revisited-format gnd pickle {'imlist', 'qimlist', 'gnd': [{'bbx', 'easy', 'hard', 'junk'}]}.

    gallery_file rows: path. queries_file rows: path, optional box (JSONL 'bbx': [x1, y1, x2, y2], or CSV columns
    x1, y1, x2, y2, in pixels). labels_file rows: query, image, label ('positive' = 'easy', 'hard' or 'junk');
    unlabelled gallery images are negatives. A query that is also a gallery image is marked junk for itself
    (the protocol assumes queries are not in the gallery). Returns {'gnd', 'images_root', 'gallery', 'queries',
    'queries_without_positives'}.
    """
    gallery_file, queries_file, labels_file = Path(gallery_file), Path(queries_file), Path(labels_file)
    root = Path(images_root) if images_root is not None else gallery_file.parent
    imlist = [_image_name(_field(r, "path", gallery_file, n), root, gallery_file, n, check_images)
              for n, r in read_records(gallery_file)]
    gallery = _index(imlist, gallery_file, "gallery image")
    qrows = read_records(queries_file)
    qimlist = [_image_name(_field(r, "path", queries_file, n), root, queries_file, n, check_images) for n, r in qrows]
    queries = _index(qimlist, queries_file, "query")
    gnd = [{"bbx": _bbx(r, queries_file, n), "easy": [], "hard": [], "junk": []} for n, r in qrows]
    labelled: dict[tuple[int, int], str] = {}
    for n, row in read_records(labels_file):
        q = _lookup(queries, _image_name(_field(row, "query", labels_file, n), root, labels_file, n, False), "queries", labels_file, n)
        g = _lookup(gallery, _image_name(_field(row, "image", labels_file, n), root, labels_file, n, False), "gallery", labels_file, n)
        label = LABELS.get(str(_field(row, "label", labels_file, n)).lower())
        if label is None:
            raise EngineError(f"line {n}: label must be one of {', '.join(LABELS)}, got {row['label']!r}", labels_file)
        if (q, g) in labelled:
            if labelled[q, g] != label:
                raise EngineError(f"line {n}: {imlist[g]!r} is labelled both {labelled[q, g]} and {label} for this query", labels_file)
            continue
        labelled[q, g] = label
        gnd[q][label].append(g)
    for q, name in enumerate(qimlist):
        if name in gallery and (q, gallery[name]) not in labelled:
            gnd[q]["junk"].append(gallery[name])
    for entry in gnd:
        for key in ("easy", "hard", "junk"):
            entry[key].sort()
    write_pickle({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, Path(out_path))
    return {"gnd": str(out_path), "images_root": str(root), "gallery": len(imlist), "queries": len(qimlist),
            "queries_without_positives": sum(not (e["easy"] or e["hard"]) for e in gnd)}


def _field(row: dict, key: str, path: Path, n: int):
    if key not in row:
        raise EngineError(f"line {n}: missing '{key}'", path)
    return row[key]


def _image_name(value, root: Path, path: Path, n: int, check: bool) -> str:
    """The image's path relative to `root`, POSIX-style; absolute paths must lie under `root`."""
    p = Path(str(value))
    full = p if p.is_absolute() else root / p
    try:
        rel = p.resolve().relative_to(root.resolve()) if p.is_absolute() else p
    except ValueError:
        raise EngineError(f"line {n}: {value!r} is not under the images root {root}", path) from None
    if ".." in rel.parts or not rel.suffix:
        raise EngineError(f"line {n}: image path {value!r} must stay inside the images root and have an extension", path)
    if check and not full.is_file():
        raise EngineError(f"line {n}: image not found: {full}", path)
    return rel.as_posix()


def _index(names: list[str], path: Path, what: str) -> dict[str, int]:
    index: dict[str, int] = {}
    for i, name in enumerate(names):
        if index.setdefault(name, i) != i:
            raise EngineError(f"{what} {name!r} is listed twice", path)
    return index


def _lookup(index: dict[str, int], name: str, what: str, path: Path, n: int) -> int:
    if name not in index:
        raise EngineError(f"line {n}: {name!r} is not in the {what} list", path)
    return index[name]


def _bbx(row: dict, path: Path, n: int) -> list[float] | None:
    """[x1, y1, x2, y2] from JSONL 'bbx' or CSV columns x1..y2; None when the row has no box."""
    if "bbx" in row:
        box = row["bbx"]
    elif any(k in row for k in _BBX):
        box = [row.get(k) for k in _BBX]
    else:
        return None
    try:
        box = [float(v) for v in box]
    except (TypeError, ValueError):
        raise EngineError(f"line {n}: box must be four numbers x1, y1, x2, y2, got {box!r}", path) from None
    if len(box) != 4 or box[2] <= box[0] or box[3] <= box[1]:
        raise EngineError(f"line {n}: box must be x1, y1, x2, y2 with x2 > x1 and y2 > y1, got {box}", path)
    return box


def _read_pairs(path: Path, root: Path, where: dict, clusters: dict) -> dict[str, list[tuple[int, int]]]:
    pairs = {s: [] for s in SPLITS}
    for n, row in read_records(path):
        ends = []
        for key in ("query", "positive"):
            name = _image_name(_field(row, key, path, n), root, path, n, False)
            if name not in where:
                raise EngineError(f"line {n}: {key} {name!r} is not in the images list", path)
            ends.append(where[name])
        (qs, q), (ps, p) = ends
        if qs != ps or q == p or clusters[qs][q] != clusters[ps][p]:
            raise EngineError(f"line {n}: a pair must join two different images of one instance in one split", path)
        pairs[qs].append((q, p))
    return pairs


def _sample_pairs(cluster: list[int], rng: np.random.Generator) -> list[tuple[int, int]]:
    """Each image of a cluster with two or more images as a query, with a random other image of it as positive."""
    members = defaultdict(list)
    for i, c in enumerate(cluster):
        members[c].append(i)
    pairs = []
    for c in sorted(members):
        m = members[c]
        for pos, i in enumerate(m if len(m) > 1 else []):
            r = int(rng.integers(len(m) - 1))
            pairs.append((i, m[r if r < pos else r + 1]))  # r skips the query's own position
    return sorted(pairs)
