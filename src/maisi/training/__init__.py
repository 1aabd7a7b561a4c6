"""Training of the three stages."""
