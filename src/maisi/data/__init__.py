"""Data: phantoms, preparation of real scans, datasets."""
