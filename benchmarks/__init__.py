"""Benchmarks of jackpot_jax (scripts; see each module's docstring)."""
