"""Evaluation and reporting: feature extraction, retrieval metrics, the results table, the
ablation tables and the figures."""
