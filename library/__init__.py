"""Shared library of the toolkit: model I/O, text encoding, data, training pieces."""
