"""`engine report`: the page rendered by headless Chromium, plots, thumbnails cache, bad input."""
import json
import os
import shutil
import subprocess
import time
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from engine.datasets.revisited import load_gnd
from engine.errors import EXIT_INPUT, EngineError
from engine.evaluate import PROTOCOLS, compute_map, ranks_from_ids
from engine.report import write_report
from engine.report.curves import precision_recall

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)


def perfect_ids(gnd: dict) -> np.ndarray:
    """Per query: easy, hard, junk, then the rest (a teacher that is always right)."""
    n = len(gnd["imlist"])
    rows = []
    for e in gnd["gnd"]:
        head = [*e["easy"], *e["hard"], *e["junk"]]
        rows.append(head + [i for i in range(n) if i not in head])
    return np.array(rows, dtype=np.int64)


def save_result(path, ids):
    scores = np.sort(np.random.default_rng(1).random(ids.shape).astype(np.float32), axis=1)[:, ::-1]
    np.savez(path, ids=ids, scores=scores)
    return path


@pytest.fixture(scope="module")
def bench(tiny_bench, tmp_path_factory):
    """The tiny benchmark's images copied (tests may delete or touch them), two result sets and plot inputs."""
    root = tmp_path_factory.mktemp("report_bench")
    shutil.copytree(tiny_bench / "jpg", root / "jpg")
    shutil.copy(tiny_bench / "gnd.pkl", root / "gnd.pkl")
    gnd = load_gnd(root / "gnd.pkl")
    rng = np.random.default_rng(0)
    student = np.stack([rng.permutation(len(gnd["imlist"])) for _ in gnd["qimlist"]])
    save_result(root / "teacher.npz", perfect_ids(gnd))
    save_result(root / "student.npz", student)
    (root / "speed.json").write_text(json.dumps([{"label": "teacher", "images_per_s": 40.0, "mAP": 80.0},
                                                 {"label": "student", "images_per_s": 900, "mAP": 61.5}]))
    (root / "train.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"epoch": 0, "loss": 0.9, "val_asym_mAP": 20.0, "val_sym_mAP": 15.0},
        {"epoch": 1, "loss": 0.5, "val_asym_mAP": None, "val_sym_mAP": None},
        {"epoch": 2, "loss": 0.4, "val_asym_mAP": 48.0, "val_sym_mAP": 41.0}]) + "\n")
    return root, gnd


@pytest.fixture(scope="module")
def report(bench):
    root, _ = bench
    results = [("teacher", root / "teacher.npz"), ("student", root / "student.npz")]
    index = write_report(root / "gnd.pkl", results, root / "jpg", root / "out", top_n=6,
                         curves=root / "train.jsonl", speed=root / "speed.json")
    return index


class Elements(HTMLParser):
    """Every start tag as (tag, attrs, classes), and the text inside elements with an id."""

    def __init__(self, text: str):
        super().__init__()
        self.elements, self.text, self._open = [], {}, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.elements.append((tag, attrs, set((attrs.get("class") or "").split())))
        self._open = attrs.get("id")

    def handle_data(self, data):
        if self._open:
            self.text[self._open] = self.text.get(self._open, "") + data

    def find(self, tag, cls):
        return [a for t, a, c in self.elements if t == tag and cls in c]


def chromium(url, tmp_path, *args):
    if CHROMIUM is None:
        pytest.skip("chromium not installed (CI installs Debian's chromium)")
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
           *args, url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=True).stdout


def test_page_in_chromium_shows_engine_numbers(report, bench, tmp_path):
    root, gnd = bench
    dom = Elements(chromium(report.as_uri(), tmp_path, "--dump-dom"))
    queries = dom.find("article", "query")
    assert [q["data-name"] for q in queries] == gnd["qimlist"]
    assert dom.text["shown"] == f"{len(gnd['qimlist'])} of {len(gnd['qimlist'])} queries shown"  # the JS ran

    runs = dom.find("div", "run")
    assert len(runs) == 2 * len(queries)
    for r, name in enumerate(("teacher", "student")):
        ids = np.load(root / f"{name}.npz")["ids"]
        shown = [a for a in runs if a["data-run"] == str(r)]
        for p in PROTOCOLS:
            expected = compute_map(ranks_from_ids(ids), gnd["gnd"], p)[1]
            got = np.array([float(a[f"data-ap-{p}"]) for a in shown])
            np.testing.assert_allclose(got, expected, atol=1e-6)
    # Teacher's hits for query 0 are easy, easy, hard, junk, then a negative, in that order.
    hits = dom.find("li", "hit")[:5]
    e = gnd["gnd"][0]
    assert [h["data-label"] for h in hits] == ["easy", "easy", "hard", "junk", "neg"]
    assert [int(h["data-id"]) for h in hits[:4]] == [*e["easy"], *e["hard"], *e["junk"]]
    assert "easy" in hits[0]["class"].split() and "neg" in hits[4]["class"].split()
    assert int(hits[4]["data-id"]) not in {*e["easy"], *e["hard"], *e["junk"]}
    assert len(dom.find("img", "thumb")) == 2 * len(queries) * 6 and not dom.find("div", "missing")


def test_screenshot_is_a_real_page(report, tmp_path):
    shot = tmp_path / "page.png"
    chromium(report.as_uri(), tmp_path, f"--screenshot={shot}", "--window-size=1280,2000")
    with Image.open(shot) as im:
        assert im.format == "PNG" and im.size == (1280, 2000)
        px = np.asarray(im.convert("RGB")).astype(np.int32)
    colours = np.unique((px[..., 0] << 16) | (px[..., 1] << 8) | px[..., 2])
    assert px.std() > 20 and len(colours) > 1000  # text, plots and photos, not a blank page


def test_plots_written_and_embedded(report):
    out = report.parent
    for name in ("pr.png", "speed.png", "training.png"):
        with Image.open(out / "plots" / name) as im:
            assert im.format == "PNG" and min(im.size) > 200
    page = report.read_text()
    assert page.count("data:image/png;base64,") == 3
    assert "<script src" not in page and "<link" not in page and "http" not in page  # opens from disk, nothing fetched


def test_optional_plots_skipped_and_thumbnails_cached(bench, tmp_path):
    root, _ = bench
    results = [("teacher", root / "teacher.npz")]
    write_report(root / "gnd.pkl", results, root / "jpg", tmp_path, top_n=2)
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == ["pr.png"]
    def written():  # each thumbnail is written to a new file renamed into place: a remade one has a new inode
        return {p: p.stat().st_ino for p in (tmp_path / "thumbs").iterdir()}

    thumbs = written()
    assert len(thumbs) == 3 + 3 * 2  # each query, and its two easy positives (the teacher's top 2)
    write_report(root / "gnd.pkl", results, root / "jpg", tmp_path, top_n=2)
    assert written() == thumbs  # nothing remade

    src = root / "jpg" / "coffee_q.jpg"
    future = time.time() + 60
    os.utime(src, (future, future))
    write_report(root / "gnd.pkl", results, root / "jpg", tmp_path, top_n=2)
    changed = [p.name for p, ino in thumbs.items() if p.stat().st_ino != ino]
    assert len(changed) == 1 and changed[0].startswith("coffee_q-")


def test_precision_recall_by_hand():
    gnd = [{"easy": [0, 1], "hard": [], "junk": [5]}, {"easy": [], "hard": [], "junk": []}]
    ranks = np.array([[0, 3], [5, 0], [2, 1], [1, 2], [3, 4], [4, 5]])  # query 0: positives at ranks 0 and 2 once 5 is ignored
    rec, prec = precision_recall(ranks, gnd, "medium", recall=np.array([0.0, 0.5, 0.75, 1.0]))
    np.testing.assert_allclose(prec, [1.0, 1.0, 2 / 3, 2 / 3])
    _, top1 = precision_recall(ranks[:1], gnd, "medium", recall=np.array([0.5, 1.0]))  # a top-1 prefix never reaches recall 1
    np.testing.assert_allclose(top1, [1.0, 0.0])


def test_missing_images_become_placeholders(bench, tmp_path):
    root, gnd = bench
    images = tmp_path / "jpg"
    shutil.copytree(root / "jpg", images)
    gone = gnd["gnd"][0]["easy"][0]
    (images / f"{gnd['imlist'][gone]}.jpg").unlink()
    (images / f"{gnd['qimlist'][1]}.jpg").write_bytes(b"not a jpeg")
    with pytest.warns(UserWarning, match=r"2 image\(s\) missing or unreadable"):
        index = write_report(root / "gnd.pkl", [("teacher", root / "teacher.npz")], images, tmp_path / "out", top_n=3)
    dom = Elements(index.read_text())
    assert len(dom.find("div", "missing")) == 2 and len(dom.find("ul", "warnings")) == 1


@pytest.mark.parametrize("make, message", [
    (lambda g: np.tile(np.arange(4), (len(g["qimlist"]) + 1, 1)), "results cover 4 queries, the ground truth has 3"),
    (lambda g: np.tile(np.arange(4) + len(g["imlist"]), (len(g["qimlist"]), 1)), "results of another gallery"),
    (lambda g: np.tile(np.arange(4, dtype=np.float32), (len(g["qimlist"]), 1)), "must be integers, got float32"),
    (lambda g: np.tile([0, 1, 0, 2], (len(g["qimlist"]), 1)), "lists gallery id 0 more than once"),
    (lambda g: np.tile([0, -1, 3, 2], (len(g["qimlist"]), 1)), "must be >= 0, got -1"),
])
def test_results_that_do_not_fit_the_ground_truth(bench, tmp_path, make, message):
    root, gnd = bench
    bad = save_result(tmp_path / "bad.npz", make(gnd))
    with pytest.raises(EngineError, match=message) as err:
        write_report(root / "gnd.pkl", [("x", bad)], root / "jpg", tmp_path / "out")
    assert str(bad) in str(err.value)


@pytest.mark.parametrize("kind, text, message", [
    ("speed", '[{"label": "s", "images_per_s": 0, "mAP": 50}]', r"images_per_s must be a finite number > 0, got 0"),
    ("speed", '{"label": "s"}', "non-empty JSON list"),
    ("curves", '{"loss": 1.0}\n', "line 1 must be an object with an 'epoch'"),
    ("curves", '{"epoch": 1, "loss": "high"}\n', "line 1 loss must be a finite number"),
])
def test_bad_plot_inputs_name_the_file(bench, tmp_path, kind, text, message):
    root, _ = bench
    path = tmp_path / "input.json"
    path.write_text(text)
    with pytest.raises(EngineError, match=message) as err:
        write_report(root / "gnd.pkl", [("t", root / "teacher.npz")], root / "jpg", tmp_path / "out", **{kind: path})
    assert str(path) in str(err.value)


def test_cli_report(bench, tmp_path, run_cli):
    root, _ = bench
    code, _, err = run_cli("report", "--gnd", root / "gnd.pkl", "--results", root / "teacher.npz", "--results", root / "student.npz",
                           "--label", "teacher", "--label", "student", "--out", tmp_path / "r", "--top", 3)
    assert code == 0, err
    assert (tmp_path / "r" / "index.html").exists() and "wrote" in err
    code, _, err = run_cli("report", "--gnd", root / "gnd.pkl", "--results", root / "teacher.npz", "--label", "a", "--label", "b",
                           "--out", tmp_path / "r2")
    assert code == EXIT_INPUT and err.startswith("error: 2 --label for 1 --results")
