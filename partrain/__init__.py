"""partrain: data-parallel CNN training on CPU cores, from scratch in numpy."""

__version__ = "0.1.0"
