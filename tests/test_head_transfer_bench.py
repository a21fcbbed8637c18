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
