"""Keras 3 adapter: analysis, geometry and rewrite of Keras classifier models."""
