"""Datasets: scan folders (torch-free, for the UI too), captions, buckets, and the training dataset."""
