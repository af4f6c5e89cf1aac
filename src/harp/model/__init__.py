"""One model and its files: what a `model` argument is, loading, checkpoints, pruning, accounting."""
