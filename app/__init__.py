"""Image similarity search service: upload -> decode -> embed -> store -> search -> respond."""

__version__ = "0.1.0"
