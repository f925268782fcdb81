"""Shared helpers of the empirical module: atomic file writes, the resumable JSON-lines
store, seeded generators."""
