"""Generic helpers that know nothing about models: atomic files, problems, dtypes, progress, digests."""
