"""Studies: the experiment grids behind the notebooks (presets, variants x seeds, summaries)."""
