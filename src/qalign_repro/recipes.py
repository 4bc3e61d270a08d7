"""``python -m qalign_repro.recipes``: runs :mod:`qalign_repro.stages.recipes` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.recipes import main

if __name__ == "__main__":
    main()
