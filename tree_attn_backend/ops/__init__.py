"""The native ops built from ``csrc/``: their loaders (:mod:`.native`), their build
(:mod:`.csrc_build`, ``make setup``) and the bundle that carries them to a GPU machine
(:mod:`.gpu_bundle`). Every op has a torch/numpy oracle; importing this package loads nothing."""
