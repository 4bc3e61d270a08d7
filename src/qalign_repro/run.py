"""``python -m qalign_repro.run``: runs :mod:`qalign_repro.stages.run` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.stages.run import main

if __name__ == "__main__":
    main()
