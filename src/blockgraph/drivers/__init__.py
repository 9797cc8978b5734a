"""drivers layer."""
