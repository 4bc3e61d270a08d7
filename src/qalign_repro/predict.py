"""``python -m qalign_repro.predict``: runs :mod:`qalign_repro.stages.predict` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.predict import main

if __name__ == "__main__":
    main()
