"""The method itself, free of any run: sparsity math (per-layer counts, masks, scores, the
short restriction), N:M patterns, the mask plan, pruning criteria, the search step, the
typed search settings and the epoch-selection rules, device placement and the one-line
user error. Imports nothing else of the package."""
