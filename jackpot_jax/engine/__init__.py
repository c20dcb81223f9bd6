"""The one search loop and the library around it: ``find_jackpot``, evaluation, the checks
of a caller's batches, the chosen epoch, what a workdir keeps and what a resume must match,
and the per-epoch metrics."""
