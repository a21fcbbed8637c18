"""`engine whiten`: learn Lw for an encoder from matching pairs and save the encoder with it as its head's layer."""
from __future__ import annotations

from pathlib import Path

from engine.datasets.sfm import load_whitening_set
from engine.encode import EncodeOptions, encode_to_array
from engine.errors import EngineError
from engine.models import Encoder, save_checkpoint, space_id

from .whitening import learn_whitening, whitening_layer


def whiten_encoder(encoder: Encoder, pairs_file: str | Path, out: str | Path, opts: EncodeOptions,
                   dim: int | None = None, images_root: str | Path | None = None) -> Path:
    """Encode the pairs' images, learn (m, P), install W = P[:dim], b = -P[:dim] m in the head and save a checkpoint.

    pairs_file: a whitening pickle {'cids','qidxs','pidxs'} or an SfM-format db.pkl (its train pairs).
    A teacher's space id changes with its head (the whitened space is another space); a student keeps
    its teacher's id, since in asymmetric testing the teacher's whitening is applied to both sides.
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
    if encoder.config.get("role") == "teacher":
        encoder.config["space"] = space_id(encoder)
    return save_checkpoint(encoder, out)

