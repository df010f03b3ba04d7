"""Training: the Trainer and its loop, checkpoints, metrics."""
