"""granet."""
