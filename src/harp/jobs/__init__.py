"""One end-to-end job per command (prune, compare, analyze, eval, plan), each with its own checks."""
