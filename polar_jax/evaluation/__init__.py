"""Accuracy of Polar Sparsity decoding, scored with the decode step itself: see `scorer`, `tasks`, `selectors`."""
