"""``python -m qalign_repro.runs``: runs :mod:`qalign_repro.store.listing` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.store.listing import main

if __name__ == "__main__":
    main()
