"""``python -m qalign_repro.fsck``: runs :mod:`qalign_repro.store.fsck` (kept at the package top so the
documented command keeps working)."""

from qalign_repro.store.fsck import main

if __name__ == "__main__":
    raise SystemExit(main())
