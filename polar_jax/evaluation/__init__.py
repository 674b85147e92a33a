"""Accuracy of Polar Sparsity decoding with the engine's semantics (issue 5): see `scorer`, `tasks`, `selectors`."""
