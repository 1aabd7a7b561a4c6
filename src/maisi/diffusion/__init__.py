"""Noise schedulers, samplers and guidance, kept apart from the networks."""
