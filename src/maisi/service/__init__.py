"""`maisi serve`: a REST service compatible with NVIDIA's MAISI NIM, with a persisted job queue."""
