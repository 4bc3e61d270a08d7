"""qalign-repro: reproduce, extend and plot test-time alignment results (QAlign and friends).

The in-process API (``qalign_repro.api``) is exported lazily, so ``import qalign_repro`` stays cheap for the
stages and the CLI: ``from qalign_repro import QAlign, CARDS, SSS, Ancestral, load_model, load_reward, load_task``.
"""

__version__ = "0.1.0"

_API = ("Ancestral", "CARDS", "QAlign", "SSS", "load_model", "load_reward", "load_task")
__all__ = ["__version__", *_API]


def __getattr__(name: str):
    if name in _API:
        from qalign_repro import api

        return getattr(api, name)
    raise AttributeError(f"module 'qalign_repro' has no attribute {name!r}")
