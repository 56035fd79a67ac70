"""Class-incremental continual learning: NMC baseline and NAPA-VQ, and the per-task training driver."""
