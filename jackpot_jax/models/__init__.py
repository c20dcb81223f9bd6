"""Flax models named like the checkpoints they convert from (the zoo: CNNs, ViTs, a GPT),
models given by import path, and the finder of a model's output layer."""
