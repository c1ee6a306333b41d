"""Learning from the corpus itself, without labels: mine matching pairs (global kNN, then spatial
verification) and learn a whitening of the global descriptors from them."""
