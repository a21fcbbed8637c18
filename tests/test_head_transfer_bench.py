"""bench/head_transfer.py measures heads on cached per-scale features: its descriptor must be the engine's."""
import importlib.util
from pathlib import Path

import torch

from engine.datasets.photos import pip_photos
from engine.images import load_image
from engine.models import build_student
from engine.multiscale import PROTOCOL_SCALES, describe

_spec = importlib.util.spec_from_file_location("head_transfer", Path(__file__).parents[1] / "bench" / "head_transfer.py")
head_transfer = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(head_transfer)


def test_descriptor_from_cached_features_is_the_students_multiscale_descriptor():
    torch.manual_seed(0)
    # ImageNet weights and photographs: per-scale features that differ, as they do in the benchmark
    student = build_student("effnet-lite0", 16, "space").eval()
    with torch.no_grad():
        student.head.project.bias.normal_(std=0.1)  # a bias that matters, as a trained head has
    images = torch.stack([load_image(p, 96)[:, :64, :64] for p in pip_photos()[2:4]])
    pooled = head_transfer.pooled_encoder(student)
    per_scale = [describe(pooled, images, (s,)) for s in PROTOCOL_SCALES]
    head = student.head.project
    got = head_transfer.describe(per_scale, head.weight.detach(), head.bias.detach())
    want = describe(student, images, PROTOCOL_SCALES)
    assert got.shape == (2, 16)
    assert torch.allclose(got, want, atol=1e-5)
    assert student.head.project.out_features == 16  # the identity projection went on a copy


def test_shifted_queries_are_the_bridge_at_zero_and_move_towards_the_gallery_away_from_the_training_mean():
    # two scenes of two gallery images each; the training mean points at scene 1's images
    gallery = torch.nn.functional.normalize(torch.tensor([[1.0, 0, 0.2], [1.0, 0, 0.3], [0.2, 1.0, 0], [0.3, 1.0, 0]]), dim=1)
    query = torch.tensor([[0.8, 0.6, 0.0]])
    f = {"queries": [query], "W": torch.eye(3), "b": torch.zeros(3), "gallery_teacher": gallery,
         "train_teacher": torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]),
         "gnd": [{"easy": [2, 3], "hard": [], "junk": []}]}
    unshifted = head_transfer.asym_map(f, f["W"], f["b"])
    assert head_transfer.shifted_queries_map(f, 0.0) == unshifted
    assert unshifted < 100.0  # the query leans to scene 1, the wrong one
    assert head_transfer.shifted_queries_map(f, 0.5) == 100.0  # without the mean, scene 2 ranks first
