"""Pseudo labels: exact neighbour lists, the k-reciprocal Jaccard distance, view fusion and
DBSCAN, and the label sources an epoch trains from."""
