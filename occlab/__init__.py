"""occlab: a Jupyter-first reproducible study kit for 4D semantic-occupancy generation."""
__version__ = "0.1.0"
