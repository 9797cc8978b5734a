"""Test-only helpers that let drivers run without the graph."""
