"""``python -m qalign_repro.plot``: runs :mod:`qalign_repro.stages.plot` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.plot import main

if __name__ == "__main__":
    main()
