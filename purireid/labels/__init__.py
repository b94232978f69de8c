"""Pseudo labels: exact neighbour lists, the k-reciprocal Jaccard distance, view fusion and
DBSCAN, the label sources an epoch trains from, and diagnostics of an epoch's labels."""
