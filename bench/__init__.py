"""ckptd benchmark suite: ``python -m bench`` (see bench/RESULTS.md)."""
