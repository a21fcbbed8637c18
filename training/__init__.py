"""Training a student towards a teacher's embedding space.

losses     tuple losses (contrastive, contrastive+, triplet, multi-similarity) and
           knowledge-transfer losses (regression, RKD, DarkRank, CSD) behind one interface,
           loss(student, teacher, refs, neighbours), with declared needs; `make_loss(name, **options)`
mining     hard and random negatives (one per cluster), teacher nearest neighbours
whitening  learned whitening (Lw) from matching pairs, as numpy arrays or a linear layer
trainer    the training loop and its configuration (TrainConfig); recipes: named presets of it (demo, aml)
adapt      label-free gallery adaptation: a student fitted to a gallery store's own images (transductive)
"""
