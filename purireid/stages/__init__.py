"""Stage entry points, one module per workflow rule (prepare_dataset, train_teacher,
extract_teacher_features, train_student, train_supervised, evaluate), each
`run(config, *, paths...)`. See docs/architecture.md."""
