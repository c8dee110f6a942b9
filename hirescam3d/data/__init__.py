"""Synthetic data: the chest CT phantom, the bundled sample and nnU-Net phantom datasets."""
