"""No import cycles among the ``qalign_repro`` modules (issue 17), counting function-level imports too; and the
checker (``scripts/import_cycles.py``) finds the kinds of cycle it claims to, on a made-up package."""

from __future__ import annotations

import importlib.util
import textwrap
from pathlib import Path

from _helpers import REPO

_spec = importlib.util.spec_from_file_location("import_cycles", REPO / "scripts" / "import_cycles.py")
import_cycles = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(import_cycles)


def test_the_package_has_no_import_cycle():
    graph = import_cycles.import_graph()
    assert len(graph) > 50 and "qalign_repro.stages.run" in graph  # it read the real package
    assert "qalign_repro.backends" in graph["qalign_repro.stages.calibrate"]  # function-level and top-level alike
    assert import_cycles.cycle_report(graph) == []


def _package(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "qalign_repro"
    for rel, text in {"__init__.py": "", **files}.items():
        path = pkg / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return pkg


def test_function_level_from_and_relative_imports_make_cycles(tmp_path):
    pkg = _package(tmp_path, {
        "a.py": "def f():\n    from qalign_repro.b import g\n",          # inside a function
        "b.py": "from qalign_repro import a\n",                           # a module through its package
        "sub/__init__.py": "",
        "sub/c.py": "from . import d\n",                                    # relative
        "sub/d.py": "import qalign_repro.sub.c\n",
        "e.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from qalign_repro import f\n",
        "f.py": "import qalign_repro.e\n",                                  # e -> f only for type checkers
    })
    graph = import_cycles.import_graph(pkg)
    assert import_cycles.strongly_connected(graph) == [["qalign_repro.a", "qalign_repro.b"],
                                                       ["qalign_repro.sub.c", "qalign_repro.sub.d"]]
    assert import_cycles.shortest_cycle(graph, "qalign_repro.a") == ["qalign_repro.a", "qalign_repro.b",
                                                                     "qalign_repro.a"]
    assert import_cycles.main([str(pkg)]) == 1


def test_a_package_init_counts_for_its_modules(tmp_path):
    """``import qalign_repro.lm.hf`` runs ``lm/__init__.py`` first: a cycle through the package's init counts."""
    pkg = _package(tmp_path, {"lm/__init__.py": "from qalign_repro.stage import x\n", "lm/hf.py": "",
                              "stage.py": "from qalign_repro.lm.hf import y\nx = 1\n"})
    assert import_cycles.strongly_connected(import_cycles.import_graph(pkg)) == [["qalign_repro.lm",
                                                                                  "qalign_repro.stage"]]


def test_no_cycle_exits_zero_and_a_bad_folder_is_one_line(tmp_path, capsys):
    pkg = _package(tmp_path, {"a.py": "import qalign_repro.b\n", "b.py": "import os\n"})
    assert import_cycles.main([str(pkg)]) == 0
    assert "0 import cycle(s)" in capsys.readouterr().out
    assert import_cycles.main([str(tmp_path / "nowhere")]) == 2
    assert "is not a package folder" in capsys.readouterr().err
