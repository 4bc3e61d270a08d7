"""``python -m qalign_repro.summary``: runs :mod:`qalign_repro.stages.summary` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.summary import main

if __name__ == "__main__":
    main()
