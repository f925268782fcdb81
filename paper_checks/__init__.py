"""paper_checks: every claim of the paper as a runnable check (the main job)."""
