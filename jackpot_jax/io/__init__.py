"""Files: the workdir and its lock, every orbax call (weights, search checkpoints, jackpot
bundles), and weights from and to other frameworks (PyTorch, torchvision)."""
