"""Flower ServerApp and merge strategies (MergeRec, WeaveRec): thin wrappers over fedmerge."""
