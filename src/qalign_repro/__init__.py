"""qalign-repro: reproduce, extend and plot test-time alignment results (QAlign and friends)."""

__version__ = "0.1.0"
