"""Training: the step loop, the loss terms and cluster memories, advice on a run's settings."""
