"""Training recipes of the shipped demo models (each a ``python -m`` command)."""
