"""Training recipes: named presets of `TrainConfig` values; options given explicitly override them.

demo  the fast recipe of `engine demo --train`: the trunk frozen (its feature maps computed once), the head
      refined from the classifier bridge by small steps, a few epochs validated at the end.
aml   the paper's main experiment (Budnik & Avrithis, budnikm/aml over cirtorch: its train script's defaults):
      Adam at lr 1e-6, weight decay 1e-6, lr x exp(-0.01) per epoch, 100 epochs, 1024-pixel images, 5 tuples
      of a query, a positive and 5 hard negatives mined from a 20,000-image pool for 2,000 queries an epoch,
      margin 0.7, BatchNorm statistics frozen (affine weights learned), regression summed over 5-image
      batches of 20,000 images an epoch onto the raw (uncentred) teacher vectors, multi-scale validation.

README.md ("Training recipes") has the table of every value that differs and why.
"""
from __future__ import annotations

import math

# Loss options a recipe sets apply only to the losses that take them (the paper's margin means nothing to
# regression, its summed reduction nothing to RKD); an option given explicitly is always checked.
LOSS_OPTIONS = ("margin", "reduction")

RECIPES: dict[str, dict] = {
    "demo": {
        "freeze": "trunk",
        "lr": 1e-5,  # the head starts at the classifier bridge: small steps refine it, large ones undo it
        "batch_size": 4,
    },
    "aml": {
        "lr": 1e-6,
        "weight_decay": 1e-6,
        "lr_decay": 0.01,
        "epochs": 100,
        "max_side": 1024,
        "batch_size": 5,
        "images_per_batch": 5,
        "images_per_epoch": 20000,
        "query_size": 2000,
        "pool_size": 20000,
        "neg_num": 5,
        "negatives": "hard",
        "margin": 0.7,
        "reduction": "sum",
        "freeze": "stats",
        "center": False,
        "val_scales": (1.0, 1 / math.sqrt(2), 0.5),
    },
}


def recipe_values(name: str | None, takes: set[str]) -> dict:
    """The preset values of recipe `name` (None: none), less the loss options the loss does not take.

    takes: the option names the configured loss accepts (`training.losses.make_loss`'s keywords).
    An unknown name is left to `TrainConfig.check`, which names the recipes.
    """
    values = dict(RECIPES.get(name, {})) if name else {}
    return {k: v for k, v in values.items() if k not in LOSS_OPTIONS or k in takes}
