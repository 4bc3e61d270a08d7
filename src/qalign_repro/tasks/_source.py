"""Where a benchmark's rows come from: the copy shipped in the package, or a Hugging Face dataset id.

``dataset.source`` picks: ``bundled`` reads ``qalign_repro/data/<benchmark>/...`` (or ``dataset.path``);
``hub`` calls ``datasets.load_dataset(hub.id, hub.config, split=hub.split)``. ``hub.data_files`` and
``hub.cache_dir`` are passed through, so the hub path can be exercised offline on local files
(``hub.id: json`` plus ``hub.data_files``; ``{config}`` in ``data_files`` is replaced by the config name).
``SourceMixin.data_source()`` describes what was read so a run can store it in its meta.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qalign_repro.errors import ConfigError, DataError
from qalign_repro.tasks.base import Rows, bundled_data_path, read_jsonl

_SHA_CACHE: dict[tuple[str, float], str] = {}


def source_of(cfg: Mapping[str, Any], allowed: tuple[str, ...] = ("bundled", "hub")) -> str:
    source = str(cfg.get("source") or "bundled")
    if source not in allowed:
        raise ConfigError(f"dataset.source={source!r} is invalid for {cfg.get('name')!r}; allowed: {', '.join(allowed)}")
    return source


def file_sha256(path: Path) -> str:
    key = (str(path), path.stat().st_mtime)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _SHA_CACHE[key]


def bundled_path(cfg: Mapping[str, Any], *parts: str) -> Path:
    override = cfg.get("path")
    return Path(str(override)) if override else bundled_data_path(*parts)


def bundled_rows(cfg: Mapping[str, Any], *parts: str) -> Rows:
    return read_jsonl(bundled_path(cfg, *parts))


def check_bundled_split(cfg: Mapping[str, Any], bundled: str) -> None:
    """The packaged copy holds one split; asking it for another is an error, not a silent substitution."""
    split = cfg.get("split")
    if split is not None and str(split) != bundled:
        raise ConfigError(
            f"dataset.split={split!r} is not bundled for {cfg.get('name')!r} (only {bundled!r}); allowed: {bundled}, "
            "or dataset.source=hub with dataset.hub.split"
        )


def hub_settings(cfg: Mapping[str, Any]) -> dict[str, Any]:
    hub = dict(cfg.get("hub") or {})
    if not hub.get("id"):
        raise ConfigError(f"dataset.source=hub needs dataset.hub.id for {cfg.get('name')!r}; allowed: a dataset id or local path")
    return hub


def hub_rows(cfg: Mapping[str, Any], config: str | None = None) -> Rows:
    """Rows of ``hub.id`` / ``config`` (default ``hub.config``) / ``hub.split`` via ``datasets.load_dataset``."""
    hub = hub_settings(cfg)
    name = config if config is not None else hub.get("config")
    data_files = hub.get("data_files")
    if isinstance(data_files, str) and "{config}" in data_files:
        data_files = data_files.replace("{config}", str(name))
    kwargs: dict[str, Any] = {"split": hub.get("split") or cfg.get("split") or "test"}
    for key in ("revision", "cache_dir"):
        if hub.get(key):
            kwargs[key] = str(hub[key])
    if data_files:
        kwargs["data_files"] = data_files if not isinstance(data_files, Mapping) else dict(data_files)
    if not data_files:  # a hub dataset: decide once whether the hub answers (offline, the local cache only)
        from qalign_repro.models.hub import offline_reason

        offline_reason()
    try:
        from datasets import load_dataset

        ds = load_dataset(str(hub["id"]), name, **kwargs)
    except Exception as exc:  # network, missing config, bad split: one line, with the way out
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataError(
            f"could not load hub dataset {hub['id']!r} (config {name!r}, split {kwargs['split']!r}): "
            f"{type(exc).__name__}: {first}; set dataset.source=bundled to use the packaged copy"
        ) from None
    where = f"hub dataset {hub['id']!r} (config {name!r}, split {kwargs['split']!r}) row"
    return Rows((dict(row) for row in ds), (f"{where} {i}" for i in range(len(ds))))


class SourceMixin:
    """``data_source()`` for tasks that read one bundled JSONL file or one hub dataset."""

    cfg: dict[str, Any]
    #: path parts of the bundled file under ``qalign_repro/data``, and the split it holds
    bundled_file: tuple[str, ...] = ()
    bundled_split: str = "test"

    def data_source(self) -> dict[str, Any]:
        """What ``load_all`` reads, for the run's meta (source, file + sha256, or hub id/config/split)."""
        source = source_of(self.cfg, getattr(self, "sources", ("bundled", "hub")))
        if source == "hub":
            hub = hub_settings(self.cfg)
            return {"source": "hub", **{k: hub.get(k) for k in ("id", "config", "revision")},
                    "split": hub.get("split") or self.cfg.get("split")}
        check_bundled_split(self.cfg, self.bundled_split)
        path = bundled_path(self.cfg, *self.bundled_file)
        if not path.is_file():
            raise DataError(f"data file {str(path)!r} does not exist")
        return {"source": "bundled", "path": str(path), "sha256": file_sha256(path)}

    def _rows(self) -> Rows:
        if source_of(self.cfg, getattr(self, "sources", ("bundled", "hub"))) == "hub":
            return hub_rows(self.cfg)
        check_bundled_split(self.cfg, self.bundled_split)
        return bundled_rows(self.cfg, *self.bundled_file)
