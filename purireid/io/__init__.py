"""Files: atomic writes, checkpoints and resume state, the feature files."""
