"""Local training: batches, the training loop with early stopping, checkpoints."""
