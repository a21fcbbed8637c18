"""Training a student towards a teacher's embedding space.

losses     tuple losses (contrastive, contrastive+, triplet, multi-similarity) and
           knowledge-transfer losses (regression, RKD, DarkRank, CSD) behind one interface,
           loss(student, teacher, refs, neighbours), with declared needs; `make_loss(name, **options)`
mining     hard and random negatives (one per cluster), teacher nearest neighbours
whitening  learned whitening (Lw) from matching pairs, as numpy arrays or a linear layer
"""
