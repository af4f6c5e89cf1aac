"""Choosing layers, alphas and maps: the search, the refit, the baselines, their registry.

Importing the package imports `catalog`, which registers every method in `registry.METHODS`."""

from harp.methods import catalog  # noqa: F401  (registration: fills registry.METHODS)
