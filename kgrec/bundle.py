"""The trained bundle: a directory that ``kgrec train`` writes and every other command reads.

Layout::

    manifest.json     format version, package version, data fingerprint, created, components (+ per-file sha256)
    config.yaml       the resolved Config
    idmaps/           users.parquet, items.parquet (id -> dense index = row position)
    encoders/         configs (+ safetensors or a reference to packaged weights)
    embeddings/       safetensors / .npy item and user vectors (memory-mappable)
    fusion/           the GNN + fusion model (JSON config + safetensors)
    ranker/           LightGBM text model + JSON feature spec
    graph/            the embedded store, or graph.json with the Neo4j URI and database (never a password)

Saves are atomic: everything is written into a temporary sibling directory, checked, then swapped into place, so a
crash mid-save leaves the previous bundle usable. Nothing here is pickled.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kgrec import __version__
from kgrec.data.schema import atomic_write_json, file_fingerprint, replace_directory
from kgrec.errors import BundleError

BUNDLE_FORMAT_VERSION = 1
REQUIRED_COMPONENTS = ("idmaps",)


RUNTIME_PACKAGES = ("torch", "torch_geometric", "lightgbm", "numpy", "scipy", "transformers", "open_clip_torch",
                    "pyarrow", "safetensors")


def runtime_versions() -> dict[str, str | None]:
    """Python and the installed versions of the packages a bundle's files depend on (recorded in the manifest, so
    a bundle that behaves differently elsewhere can be traced to a version change)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {"python": platform.python_version()}
    for name in RUNTIME_PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def write_bundle(
    path: str | Path,
    writer: Callable[[Path], dict[str, Any]],
    *,
    data_fingerprint: str,
    config_yaml: str,
    _fail_after_write: bool = False,
) -> Path:
    """Create a bundle atomically. ``writer(tmp_dir)`` writes the components and returns extra manifest entries
    (``{"components": [...], ...}``). The manifest lists every file with its sha256 so loads detect truncation.

    ``_fail_after_write`` simulates a crash between writing and the swap (tests only).
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.tmp-"))
    try:
        extra = writer(tmp) or {}
        (tmp / "config.yaml").write_text(config_yaml, encoding="utf-8")
        files = {
            str(p.relative_to(tmp)): file_fingerprint(p)
            for p in sorted(tmp.rglob("*"))
            if p.is_file() and p.name != "manifest.json"
        }
        manifest = {
            "format_version": BUNDLE_FORMAT_VERSION,
            "package_version": __version__,
            "versions": runtime_versions(),
            "created": datetime.now(timezone.utc).isoformat(),
            "data_fingerprint": data_fingerprint,
            "components": sorted(set(extra.pop("components", [])) | set(REQUIRED_COMPONENTS)),
            "files": files,
            **extra,
        }
        atomic_write_json(tmp / "manifest.json", manifest)
        if _fail_after_write:
            raise RuntimeError("simulated crash before the bundle swap")
        replace_directory(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


@dataclass
class BundleInfo:
    path: Path
    manifest: dict[str, Any]

    def has(self, component: str) -> bool:
        return component in self.manifest.get("components", [])


def read_manifest(path: str | Path, *, verify: bool = True) -> BundleInfo:
    """Open a bundle's manifest and check format version, completeness and (``verify``) file hashes."""
    root = Path(path)
    mf = root / "manifest.json"
    if not root.is_dir():
        raise BundleError(f"bundle {root} does not exist; create one with `kgrec train DATASET --out {root}`")
    if not mf.is_file():
        raise BundleError(f"{root} is not a complete bundle (no manifest.json); re-run `kgrec train`")
    try:
        manifest = json.loads(mf.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise BundleError(f"{mf} is not valid JSON ({exc}); the bundle is damaged, re-run `kgrec train`") from exc
    if not isinstance(manifest, dict):
        raise BundleError(f"{mf} holds a JSON {type(manifest).__name__}, not an object; the bundle is damaged, "
                          "re-run `kgrec train`")
    version = manifest.get("format_version")
    if version != BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"bundle {root} has format version {version!r}, this kgrec {__version__} reads version "
            f"{BUNDLE_FORMAT_VERSION}; re-train it with this version (`kgrec train`)"
        )
    files = manifest.get("files")
    # Without its file list a bundle cannot be checked at all: refuse it rather than load it unverified.
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise BundleError(f"{mf} has no valid \"files\" map (file name -> sha256), so the bundle cannot be "
                          "verified; it is damaged, re-run `kgrec train`")
    missing = [name for name in files if not (root / name).is_file()]
    if missing:
        raise BundleError(f"bundle {root} is incomplete: missing {', '.join(sorted(missing)[:5])}")
    if verify:
        bad = [name for name, digest in files.items() if file_fingerprint(root / name) != digest]
        if bad:
            raise BundleError(f"bundle {root} is damaged: {', '.join(sorted(bad)[:5])} changed since it was written")
    return BundleInfo(root, manifest)


def write_idmap(path: Path, ids: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": pa.array(ids, type=pa.string())}), path)


def read_idmap(path: Path) -> list[str]:
    return pq.read_table(path).column("id").to_pylist()


def idmap_index(ids: list[str]) -> dict[str, int]:
    return {v: i for i, v in enumerate(ids)}


def write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def frame_to_parquet(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pandas(frame, preserve_index=False), path)
