"""Choosing layers, alphas and maps: the search, the refit, the baselines, their registry."""
