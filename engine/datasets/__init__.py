"""Datasets: revisited Oxford/Paris ground truth, SfM-120k-format training sets, the offline views benchmark, downloads."""
