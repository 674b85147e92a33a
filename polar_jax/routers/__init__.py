"""Polar Sparsity routers: modules, checkpoints, data collection, training and calibration.

  * `modules`: `HeadRouters` (d -> KV groups, per layer), `NeuronRouters` (d -> r -> N, ReLU MLPs),
    `Routers` (both plus the model fingerprint, the neuron budget table and the metadata);
  * `io`: `save_routers`, `load_routers`, `default_routers_dir` (the shipped SmolLM2-135M routers, which
    `load_routers("default", model)` loads), `routers_dir` (the directory a name or path stands for);
  * `collect` -> `train` -> `calibrate`, tied together by `pipeline.train_routers` and the
    `polar-train-routers` CLI.
"""

from polar_jax.routers.io import default_routers_dir, load_routers, read_metadata, routers_dir, save_routers
from polar_jax.routers.modules import HeadRouters, NeuronRouters, RouterMismatchError, Routers

__all__ = ["HeadRouters", "NeuronRouters", "RouterMismatchError", "Routers", "default_routers_dir",
           "load_routers", "read_metadata", "routers_dir", "save_routers"]
