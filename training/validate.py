"""Validation during training: the student's asymmetric and symmetric mAP on a held-out benchmark."""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.datasets import revisited
from engine.encode import EncodeOptions, encode_to_array
from engine.errors import EngineError
from engine.evaluate import evaluate_revisited, rank_by_similarity
from engine.models import Encoder
from engine.store import open_store


@dataclass
class ValSet:
    """A revisited-format benchmark with the teacher's vectors of its gallery (row i = imlist[i])."""

    gnd: dict
    images_dir: Path
    teacher_gallery: np.ndarray  # N x D float32


def load_val_set(gnd_path: str | Path, teacher_store: str | Path, images_dir: str | Path | None = None) -> ValSet:
    """Ground truth + the teacher store of its gallery (encoded with `engine encode --gnd GND`), checked to match."""
    gnd = revisited.load_gnd(gnd_path)
    store = open_store(teacher_store)
    if store.names() != list(gnd["imlist"]):
        raise EngineError(f"store rows are not the gallery of {gnd_path} (encode it with --gnd)", store.path)
    images = Path(images_dir) if images_dir else revisited.images_dir_for(gnd_path)
    return ValSet(gnd, images, store.vectors())


def validate(student: Encoder, val: ValSet, max_side: int, workers: int = 0, scales: tuple[float, ...] = (1.0,)) -> dict:
    """{"val_asym_mAP", "val_sym_mAP", "val_asym_hard", "val_sym_hard"}: Medium (and Hard) mAP in percent.

    scales: the student's multi-scale factors (the teacher gallery is as its store was encoded).

    The student is left as it was: a runner may convert the model it is given (eval mode, channels-last
    weights), which would change the numerics of the training that follows, so it encodes a copy.
    """
    frozen = copy.deepcopy(student).eval()
    # eager torch: an exported runner would be rebuilt for every epoch's new weights
    opts = EncodeOptions(max_side=max_side, workers=workers, progress=False, backend="torch", scales=tuple(scales))
    q, _, _ = encode_to_array(frozen, revisited.query_items(val.gnd, val.images_dir), opts)
    g, _, _ = encode_to_array(frozen, revisited.gallery_items(val.gnd, val.images_dir), opts)
    asym = evaluate_revisited(rank_by_similarity(q, val.teacher_gallery), val.gnd["gnd"])
    sym = evaluate_revisited(rank_by_similarity(q, g), val.gnd["gnd"])
    return {"val_asym_mAP": asym["medium"]["mAP"], "val_sym_mAP": sym["medium"]["mAP"],
            "val_asym_hard": asym["hard"]["mAP"], "val_sym_hard": sym["hard"]["mAP"]}
