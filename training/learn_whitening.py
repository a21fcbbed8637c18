"""`engine whiten`: give an encoder a learned whitening (Lw) and save it with it as its head's whitening layer.

Two ways: learn Lw from matching pairs of the encoder's own descriptors (`whiten_encoder`), or install a
teacher's Lw in a student trained on that teacher's raw space (`adopt_whitening`: the paper's test-time
whitening, the same Lw on both sides). Either way the whitened space is a new space id, and the encoder
records the raw one (`config["raw_space"]`, what `raw:SOURCE` gives back).
"""
from __future__ import annotations

from pathlib import Path

from engine.datasets.sfm import load_whitening_set
from engine.encode import EncodeOptions, encode_to_array
from engine.errors import EngineError
from engine.models import Encoder, save_checkpoint, space_id

from .whitening import learn_whitening, whitening_layer


def whiten_encoder(encoder: Encoder, pairs_file: str | Path, out: str | Path, opts: EncodeOptions,
                   dim: int | None = None, images_root: str | Path | None = None) -> Path:
    """Encode the pairs' images, learn (m, P), install W = P[:dim], b = -P[:dim] m as the head's whitening and
    save a checkpoint. Teachers and students alike (a student's projection stays before it).

    pairs_file: a whitening pickle {'cids','qidxs','pidxs'} or an SfM-format db.pkl (its train pairs).
    The Lw is learned on this encoder's own vectors, so the whitened output is a space of its own: its space
    id becomes the hash of its weights (a student's too: its whitened vectors are no longer its teacher's).
    """
    pairs_file = Path(pairs_file)
    if encoder.head.whiten is not None:
        raise EngineError("encoder already has a whitening layer", pairs_file)
    pairs = load_whitening_set(pairs_file, images_root)
    X, kept, skipped = encode_to_array(encoder, [(p, None) for p in pairs.images], opts)
    if skipped:
        raise EngineError(f"{len(skipped)} pair images failed to decode (first: {skipped[0]['path']})", pairs_file)
    m, P = learn_whitening(X, pairs.qidxs, pairs.pidxs)
    W, b = whitening_layer(m, P, dim)
    encoder.head.set_whitening(W, b)
    encoder.config["whitening"] = {"source": pairs_file.name, "pairs": int(len(pairs.qidxs)), "dim": int(W.shape[0])}
    encoder.config["raw_space"] = encoder.space
    encoder.config["space"] = space_id(encoder)
    return save_checkpoint(encoder, out)


def adopt_whitening(encoder: Encoder, teacher: Encoder, out: str | Path | None = None) -> Encoder:
    """Install `teacher`'s whitening in `encoder` (a student of the teacher's raw space); save it to `out` if given.

    The paper's test-time whitening: the student learned the teacher's raw (unwhitened) vectors and the
    teacher's Lw is applied to both sides afterwards, so the student then lands in the teacher's whitened
    space and takes its space id. Refused unless the student's space is the teacher's raw space.
    """
    if teacher.head.whiten is None:
        raise EngineError(f"{teacher.name} has no whitening to adopt")
    if encoder.head.whiten is not None:
        raise EngineError(f"{encoder.name} already has a whitening layer")
    raw = teacher.unwhitened()
    if encoder.space != raw.space or encoder.dim != teacher.head.whiten.in_features:
        raise EngineError(f"{encoder.name} is in space {encoder.space!r} (D = {encoder.dim}); {teacher.name}'s whitening "
                          f"applies to its raw space {raw.space!r} (D = {teacher.head.whiten.in_features}): train the "
                          f"student on vectors of raw:{teacher.name}")
    encoder.head.set_whitening(teacher.head.whiten.weight.detach().cpu(), teacher.head.whiten.bias.detach().cpu())
    encoder.config["whitening"] = {"adopted_from": teacher.name, "dim": teacher.dim}
    encoder.config["raw_space"] = encoder.space
    encoder.config["space"] = teacher.space
    if out is not None:
        save_checkpoint(encoder, out)
    return encoder
