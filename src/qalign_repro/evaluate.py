"""``python -m qalign_repro.evaluate``: runs :mod:`qalign_repro.stages.evaluate` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.evaluate import main

if __name__ == "__main__":
    main()
