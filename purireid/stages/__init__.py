"""Stage entry points, one module per workflow rule (prepare_dataset, train_teacher,
extract_teacher_features, train_student, evaluate), each `run(config, *, paths...)`; and what
they share: the training loop (trainer), checkpoints and provenance, inference, reporting,
signal handling. See docs/architecture.md."""
