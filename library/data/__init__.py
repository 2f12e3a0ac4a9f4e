"""Datasets: images, captions, bucketing, caches and the datasets built from them."""
