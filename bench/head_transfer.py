"""How far the demo's trained head can carry a student to photographs it never saw (issue 14's analysis).

The demo trains only the student's projection (the trunk frozen): a linear map from the student's pooled
features to the teacher's space, started at the classifier bridge. With the trunk frozen, the student's
descriptor of a test image at each scale is a function of that image's GeM-pooled features alone, so this
script encodes those features once (through an identity projection, at every protocol scale) with the
teacher's gallery vectors, and then measures any head in milliseconds:

- `bridge`: the untrained student (the demo's `student_asym`);
- `trained lr=...`: the head trained on the benchmark's training scenes as `engine demo --train regression`
  trains it (centred targets, Adam, 16-image batches, GeM p held at its start), asymmetric Medium mAP on
  the test scenes after each epoch;
- `fit on the test gallery`: the same head fitted to the test gallery's own images and teacher vectors
  (transductive), by the demo's optimiser, and to convergence (full batch, raw targets): an oracle for what a
  linear head on this trunk can reach on these photographs;
- the head fitted to convergence on the training images instead, and in closed form (ridge regression towards
  the bridge, at several strengths): what fitting the teacher better on other photographs does to these;
- `bridge, queries shifted`: the untrained student with a fraction of the training images' mean teacher vector
  taken from each query. The demo's regression onto centred targets learns that shift first; this row
  separates what the shift alone is worth on these photographs from what the trained head adds.

    python bench/head_transfer.py OUT [--photos DIR] [--lr 1e-5 3e-6 1e-6] [--epochs 10]

OUT receives the views benchmark and the feature cache (reused on a second run).
"""
from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import numpy as np
import torch

from engine.cli.demo import STUDENT, TEACHER
from engine.datasets import revisited
from engine.datasets.photos import default_photos, photos_in, unseen
from engine.datasets.sfm import load_training_set
from engine.datasets.views import build_views
from engine.encode import EncodeOptions, default_workers, encode_to_array
from engine.evaluate import evaluate_revisited, rank_by_similarity
from engine.files import written_by
from engine.models import Encoder, build_student, build_teacher
from engine.multiscale import PROTOCOL_SCALES
from kernels import l2n
from training.losses import regression
from training.trainer import TrainConfig


def pooled_encoder(student: Encoder) -> Encoder:
    """A copy of `student` whose projection is the identity: its descriptor at one scale is GeM -> L2 itself."""
    pooled = copy.deepcopy(student)
    c = student.head.project.in_features
    pooled.head.set_projection(torch.eye(c), torch.zeros(c))
    return pooled


def features(out: Path, photos: Path | None) -> dict:
    """Bridge, per-scale student features and teacher vectors of the test gallery, test queries and training
    images, and the test ground truth. The cache holds tensors only (read back with weights_only: a cache from
    elsewhere is data); the ground truth is read from the benchmark's gnd.pkl by its own checked reader."""
    cache = out / "head_transfer.pt"
    gnd_path = out / "views" / "test" / "gnd.pkl"
    if cache.exists():
        return {**torch.load(cache, weights_only=True), "gnd": revisited.load_gnd(gnd_path)["gnd"]}
    scene = photos_in(photos) if photos else None
    build_views(out / "views", photos=scene, train_photos=unseen(default_photos(), scene) if photos else None)
    teacher = build_teacher(TEACHER)
    student = build_student(STUDENT, teacher.dim, teacher.space, teacher=teacher.name, bridge_to=teacher)
    pooled = pooled_encoder(student)
    workers = default_workers()

    def encode(enc, items, scales=(1.0,)) -> torch.Tensor:
        return torch.from_numpy(encode_to_array(enc, items, EncodeOptions(workers=workers, scales=scales))[0])

    cfg = revisited.load_gnd(gnd_path)
    images = revisited.images_dir_for(gnd_path)
    gallery, queries = revisited.gallery_items(cfg, images), revisited.query_items(cfg, images)
    train = [(p, None) for p in load_training_set(out / "views" / "train" / "db.pkl").images]
    f = {
        "W": student.head.project.weight.detach(), "b": student.head.project.bias.detach(),
        "gallery_teacher": encode(teacher, gallery, PROTOCOL_SCALES),
        "gallery": [encode(pooled, gallery, (s,)) for s in PROTOCOL_SCALES],
        "queries": [encode(pooled, queries, (s,)) for s in PROTOCOL_SCALES],
        # as the demo trains: one scale, the teacher's vectors of the same images
        "train": [encode(pooled, train)],
        "train_teacher": encode(teacher, train),
    }
    with written_by(cache) as tmp:
        torch.save(f, tmp)
    return {**f, "gnd": cfg["gnd"]}


def describe(per_scale: list[torch.Tensor], W: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The student's multi-scale descriptor from its per-scale pooled features (engine.multiscale.describe)."""
    return l2n(sum(l2n(torch.as_tensor(x) @ W.T + b) for x in per_scale))


def queries_map(f: dict, queries: torch.Tensor) -> float:
    """Medium mAP of these query descriptors against the teacher's test gallery."""
    ranks = rank_by_similarity(queries.numpy(), f["gallery_teacher"].numpy())
    return evaluate_revisited(ranks, f["gnd"])["medium"]["mAP"]


def asym_map(f: dict, W: torch.Tensor, b: torch.Tensor) -> float:
    return queries_map(f, describe(f["queries"], W, b))


def fit(f: dict, inputs: list[torch.Tensor], targets: torch.Tensor, lr: float, epochs: int, seed: int = 0) -> list[float]:
    """Train the head from the bridge as the demo does (its recipe's weight decay, lr decay and batch; regression
    onto centred targets), at learning rate `lr`; mAP after each epoch."""
    cfg = TrainConfig.from_recipe("demo", loss="regression")
    batch = cfg.images_per_batch or 4 * cfg.batch_size  # the Trainer's batch for a loss without tuples
    t = l2n(targets - targets.mean(0))  # centred, as the Trainer centres its targets
    W, b = torch.nn.Parameter(f["W"].clone()), torch.nn.Parameter(f["b"].clone())
    opt = torch.optim.Adam([W, b], lr=lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ExponentialLR(opt, math.exp(-cfg.lr_decay))
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(epochs):
        order = torch.as_tensor(rng.permutation(len(t)))
        for i in range(0, len(t), batch):
            idx = order[i:i + batch]
            loss = regression(describe([v[idx] for v in inputs], W, b), t[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
        scores.append(asym_map(f, W.detach(), b.detach()))
    return scores


def fit_to_convergence(f: dict, inputs: list[torch.Tensor], targets: torch.Tensor, lr: float = 1e-3, steps: int = 300,
                       every: int = 50) -> list[float]:
    """The head fitted from the bridge by full-batch Adam on the raw (uncentred) targets; mAP every `every` steps."""
    W, b = torch.nn.Parameter(f["W"].clone()), torch.nn.Parameter(f["b"].clone())
    opt = torch.optim.Adam([W, b], lr=lr)
    scores = []
    for step in range(1, steps + 1):
        loss = regression(describe(inputs, W, b), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0:
            scores.append(asym_map(f, W.detach(), b.detach()))
    return scores


def shifted_queries_map(f: dict, alpha: float) -> float:
    """Asymmetric mAP of the bridge's queries minus `alpha` times the training images' mean teacher vector."""
    return queries_map(f, l2n(describe(f["queries"], f["W"], f["b"]) - alpha * f["train_teacher"].mean(0)))


def ridge_to_bridge(f: dict, x: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The affine head [W b] minimising sum_i |W x_i + b - n_i t_i|^2 + lam * N * |[W b] - bridge|^2 in closed form,
    each target t_i (unit) taken at the norm n_i of the bridge's output for x_i, so that the bridge is the solution
    whenever it points every image at its teacher vector. One scale, in float64."""
    x = torch.cat([x.double(), torch.ones(len(x), 1, dtype=torch.float64)], 1)
    bridge = torch.cat([f["W"], f["b"][:, None]], 1).double()
    t = targets.double() * (x @ bridge.T).norm(dim=1, keepdim=True)
    reg = lam * len(x) * torch.eye(x.shape[1], dtype=torch.float64)
    head = torch.linalg.solve(x.T @ x + reg, x.T @ t + lam * len(x) * bridge.T).T
    return head[:, :-1].float(), head[:, -1].float()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--photos", type=Path, help="a photo folder: every photograph a test scene (engine demo --photos)")
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-5, 3e-6, 1e-6])
    ap.add_argument("--epochs", type=int, default=10)
    args = ap.parse_args(argv)
    f = features(args.out, args.photos)
    print(f"bridge (untrained): {asym_map(f, f['W'], f['b']):.2f}")
    print("bridge, queries shifted by -alpha x the training images' mean teacher vector, alpha "
          + ", ".join(f"{a:g}: {shifted_queries_map(f, a):.2f}" for a in (0.125, 0.25, 0.5)))
    for lr in args.lr:
        scores = fit(f, f["train"], f["train_teacher"], lr, args.epochs)
        print(f"trained lr={lr:g}, epochs 1..{args.epochs}: " + " ".join(f"{s:.2f}" for s in scores))
    oracle = fit(f, f["gallery"], f["gallery_teacher"], 1e-5, args.epochs)
    print(f"fit on the test gallery (transductive), lr=1e-05, best epoch: {max(oracle):.2f}")
    steps = "full batch, raw targets, steps 50..300"
    print(f"fit on the test gallery to convergence ({steps}): "
          + " ".join(f"{s:.2f}" for s in fit_to_convergence(f, f["gallery"], f["gallery_teacher"])))
    print(f"fit on the training images to convergence ({steps}): "
          + " ".join(f"{s:.2f}" for s in fit_to_convergence(f, f["train"], f["train_teacher"])))
    print("ridge towards the bridge on the training images, lambda " + ", ".join(
        f"{lam:g}: {asym_map(f, *ridge_to_bridge(f, f['train'][0], f['train_teacher'], lam)):.2f}"
        for lam in (1e-4, 1e-3, 1e-2, 1e-1, 1.0)))


if __name__ == "__main__":
    main()
