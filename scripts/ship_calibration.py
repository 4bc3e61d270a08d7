"""Ship a calibration with the reward model it was made for, so ``beta=auto`` runs of the same models and
``calibrate`` settings (``experiment=tiny`` in ``make demo``) reuse it instead of calibrating each time.

    python -m qalign_repro.calibrate experiment=tiny           # -> results/calibration/tiny.json
    python scripts/ship_calibration.py results/calibration/tiny.json

Why a script and not a calibrate option: an extra ``calibrate`` key would become part of the settings a stored
calibration must match. The entry replaces any shipped one for the same models, dataset and settings; it keeps
the weight fingerprints, so retraining either model makes runs ignore it (and ``tests/test_demo.py`` fail,
saying to rerun these two commands).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qalign_repro.models.tiny import assets_dir
from qalign_repro.stages.calibrate import SHIPPED_FILE

KEY = ("model", "reward", "dataset", "settings")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("calibration", type=Path, help="a JSON written by python -m qalign_repro.calibrate")
    ap.add_argument("--reward-folder", type=Path, default=assets_dir("tiny-rm"),
                    help="the reward model's folder (default: the shipped tiny-rm)")
    args = ap.parse_args(argv)
    entry = json.loads(args.calibration.read_text())
    if not all(entry.get("weights", {}).values()):
        print(f"error: {args.calibration} has no weight fingerprints; allowed: a file written by "
              "python -m qalign_repro.calibrate", file=sys.stderr)
        return 2
    target = args.reward_folder / SHIPPED_FILE
    shipped = json.loads(target.read_text()) if target.is_file() else {"calibrations": []}
    kept = [e for e in shipped["calibrations"] if tuple(e.get(k) for k in KEY) != tuple(entry.get(k) for k in KEY)]
    shipped["calibrations"] = [*kept, entry]
    target.write_text(json.dumps(shipped, indent=2) + "\n")
    print(f"beta={entry['beta']:.4g} for {entry['model']} + {entry['reward']} on {entry['dataset']} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
