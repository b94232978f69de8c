"""Training: the step loop, the loss terms and cluster memories, diagnostics of an epoch."""
