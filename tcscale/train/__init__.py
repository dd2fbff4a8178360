"""Training: distributed set-up, DeepSpeed engine, checkpoints, the training loop, export."""
