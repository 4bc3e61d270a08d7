"""``python -m qalign_repro.plan``: runs :mod:`qalign_repro.stages.plan` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.plan import main

if __name__ == "__main__":
    main()
