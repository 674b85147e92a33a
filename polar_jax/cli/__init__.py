"""Command-line tools: polar-convert, polar-generate."""
