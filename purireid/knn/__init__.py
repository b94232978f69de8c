"""Exact nearest neighbours: the one engine (backend choice, key grid, error bounds, candidate scan,
gallery index) behind the pseudo labels' self-kNN, the gallery search and `purireid doctor`."""
