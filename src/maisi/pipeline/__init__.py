"""Inference pipeline: generation with validation and quality checks."""
