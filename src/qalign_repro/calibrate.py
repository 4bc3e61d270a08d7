"""``python -m qalign_repro.calibrate``: runs :mod:`qalign_repro.stages.calibrate` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.calibrate import main

if __name__ == "__main__":
    main()
