"""maisi: Medical AI for Synthetic Imaging — 3D CT generation with anatomy masks."""

__version__ = "0.1.0"
