"""Kill/resume campaigns with the real tiny HF models (``backend=hf``), run as a separate process.

Why a separate process: the campaign forks children after importing torch and transformers once; the pytest
process may already have run torch ops (OpenMP threads), after which forking is not safe. Here nothing runs a
torch op before the forks. Usage: ``python hf_campaign.py <workdir> <report.json>``; exit 0 when every
assertion held, and the report lists the kills.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

#: the real tiny policy and RM; small enough for a few kills on 2 CPU cores
HF = ["progress=false", "dataset.n=2", "max_new_tokens=16"]
#: (method, steps, kills, seed, extra overrides): both on the default (async) schedule; ancestral samples are
#: submitted in bulk, two at a time here, so that commits (and kills between them) happen mid-run
CAMPAIGNS = [("qalign", 4, 3, 3, []), ("ancestral", 3, 1, 5, ["in_flight=2"])]


def main(workdir: Path, out: Path) -> None:
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from crashkit import PhaseBoard, assert_same_as_reference, campaign

    import qalign_repro.lm.hf  # noqa: F401
    import qalign_repro.rm.hf  # noqa: F401
    import qalign_repro.stages.run  # noqa: F401
    from qalign_repro.cli import compose_config

    board = PhaseBoard()
    report = {}
    for method, steps, kills, seed, extra in CAMPAIGNS:
        args = [*HF, f"method={method}", f"steps={steps}", f"seed={seed}", *extra]
        cfg = compose_config([*args, f"output_root={workdir / method}"])
        ref_cfg = compose_config([*args, f"output_root={workdir / (method + '-reference')}"])
        record, final, reference = campaign(cfg, ref_cfg, steps=steps, target_kills=kills, seed=seed, board=board,
                                            logdir=workdir, slow=0.0, phase_delay=0.03,
                                            kinds=("phase", "hook"), phase_points=("generate",),
                                            whole_steps=False)
        assert_same_as_reference(final, reference)
        report[method] = {"kills": record.kills, "phases": record.phases(), "episodes": record.summary()}
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
