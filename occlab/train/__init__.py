"""Training: the shared trainer, losses, checkpoints and the run cache."""
