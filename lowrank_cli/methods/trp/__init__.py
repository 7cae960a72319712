"""Trained Rank Pruning (Xu et al., arXiv 1812.02402): periodic truncated-SVD projection of the weights and a
nuclear-norm sub-gradient during ordinary training (`callback`), the SVD pieces both use (`svd`), and the
final factorization into low-rank layers, Linear and channel-wise Conv2d (`factorize`)."""
