"""Measurements of a backbone's outputs that training and the tools share: weighted kNN scoring
(:mod:`~dinoreg.metrics.knn`) and patch-token norms (:mod:`~dinoreg.metrics.tokens`). Tensors in, numbers out."""
