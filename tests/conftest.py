"""Shared fixtures: a tiny instance-retrieval benchmark in the revisited layout, and a CLI runner."""
import os
import pickle
import sys

# Triton reads TRITON_INTERPRET when its own functions and ours are decorated, and importing torchvision imports
# triton: so it is set here, before any test module is collected, and the kernels run in Triton's interpreter on
# CPU tensors (tests/test_kernels.py). AML_KERNELS_CUDA=1 runs them compiled on a CUDA device instead.
if os.environ.get("AML_KERNELS_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
from PIL import Image
from skimage import data


def crop(img: np.ndarray, fx: float, fy: float, fw: float, fh: float) -> np.ndarray:
    h, w = img.shape[:2]
    return img[int(fy * h):int((fy + fh) * h), int(fx * w):int((fx + fw) * w)]


@pytest.fixture(scope="session")
def tiny_bench(tmp_path_factory):
    """3 scenes x 4 gallery crops, 1 query per scene (its bbx around the centre); one hard and one junk view each.

    Returns the folder; the ground truth is at `gnd.pkl`, images in `jpg/`.
    """
    root = tmp_path_factory.mktemp("tiny_bench")
    (root / "jpg").mkdir()
    scenes = {"astronaut": data.astronaut(), "coffee": data.coffee(), "chelsea": data.chelsea()}
    imlist, qimlist, gnd = [], [], []
    views = [(0.05, 0.05, 0.8, 0.8), (0.15, 0.1, 0.8, 0.85), (0.3, 0.3, 0.7, 0.7), (0.8, 0.0, 0.2, 0.2)]
    for name, img in scenes.items():
        start = len(imlist)
        for v, box in enumerate(views):
            Image.fromarray(crop(img, *box)).save(root / "jpg" / f"{name}_g{v}.jpg", quality=90)
            imlist.append(f"{name}_g{v}")
        Image.fromarray(img).save(root / "jpg" / f"{name}_q.jpg", quality=90)
        qimlist.append(f"{name}_q")
        h, w = img.shape[:2]
        gnd.append({"bbx": [0.2 * w, 0.2 * h, 0.8 * w, 0.8 * h], "easy": [start, start + 1], "hard": [start + 2], "junk": [start + 3]})
    with open(root / "gnd.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return root


@pytest.fixture
def photo_folder(tmp_path):
    """Six scikit-image photographs as JPEGs in one folder: a folder of one's own for `engine demo --photos`."""
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket", "coins", "camera"):
        Image.fromarray(getattr(data, name)()).convert("RGB").save(photos / f"{name}.jpg", quality=92)
    return photos


@pytest.fixture
def run_cli(capsys, monkeypatch):
    """Run `engine ARGS...` in-process; returns (exit code, stdout, stderr)."""
    from engine.cli import main

    def run(*args):
        monkeypatch.setattr(sys, "argv", ["engine", *map(str, args)])
        code = 0
        try:
            main()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


@pytest.fixture(scope="session")
def tiny_train(tmp_path_factory):
    """A training set in SfM-120k format: 4 photographs x 4 crops, one cluster per photograph.

    Returns the folder: images in jpg/, the set at train/db.pkl.
    """
    root = tmp_path_factory.mktemp("tiny_train")
    (root / "jpg").mkdir()
    (root / "train").mkdir()
    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    views = [(0.0, 0.0, 0.8, 0.8), (0.2, 0.2, 0.8, 0.8), (0.1, 0.0, 0.7, 0.9), (0.0, 0.1, 0.9, 0.7)]
    cids, cluster, qidxs, pidxs = [], [], [], []
    for c, img in enumerate(photos):
        for v, box in enumerate(views):
            cid = f"p{c}v{v}"
            Image.fromarray(crop(img, *box)).save(root / "jpg" / f"{cid}.jpg", quality=90)
            cids.append(cid)
            cluster.append(c)
        qidxs += [4 * c, 4 * c + 2]
        pidxs += [4 * c + 1, 4 * c + 3]
    split = {"cids": cids, "cluster": cluster, "qidxs": qidxs, "pidxs": pidxs}
    with open(root / "train" / "db.pkl", "wb") as f:
        pickle.dump({"train": split, "val": split}, f)
    return root
