"""What a jackpot is compared with: masks from other pruning criteria (magnitude, random,
SNIP, GraSP, SynFlow, Wanda) and SparseGPT's solver, at the same per-layer counts."""
