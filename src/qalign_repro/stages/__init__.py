"""The pipeline's stages, one module each (``python -m qalign_repro.<stage>`` runs them through the shims at the package top)."""
