"""The command line's layer: ml_collections configs and their checks, the modes (demo,
pretrain, search, tune, evaluate, export and the studies), the weight-training loop and
the figures. A config stops here: everything below takes plain values."""
