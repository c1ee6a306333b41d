"""Re-ranking the shortlist of a global search (query expansion)."""
