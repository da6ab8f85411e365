"""Datasets: find captioned images, turn them into tensors, cache what the frozen models make of them."""
