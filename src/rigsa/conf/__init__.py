"""Hydra config root (shipped inside the package)."""
