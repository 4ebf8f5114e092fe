"""The bundle folder: what `radpath bundle export` writes and `radpath predict-case` reads.

    B/bundle.json                       format version, classes, the ensemble (id, method, members,
                                        weights), each member's models, the tile recipe, the
                                        embedders (name, weights hash, seed, and per magnification
                                        the transform their models were trained on), the predict
                                        settings and seed, each MRI member's preprocessing (its
                                        models' version), and a manifest of every file with its
                                        size and SHA-256
    B/store.json                        so that B opens as a (read-only, models-only) store
    B/models/<model_id>/                model.safetensors + config.json of every member's models
    B/embedders/<embedder_id>/model.safetensors   the embedder of head-mode slide models as the
                                        store's `normstats.store_embedder` builds it (always shipped:
                                        random or timm weights rebuilt on another machine could
                                        differ, and a random one's batch-norm statistics come from
                                        the store's tiles)
"""

from __future__ import annotations

import json
from pathlib import Path

from radpath_fs import CLASSES
from radpath_fs.errors import InputError
from radpath_fs.layout import BUNDLE_JSON
from radpath_fs.weights import sha256_file

FORMAT = "radpath-bundle"
FORMAT_VERSION = 2  # the layout of bundle.json; `read_bundle` refuses any other (re-export the bundle)


def read_bundle(bundle: str | Path) -> dict:
    """bundle.json, after checking that every file it lists is there, whole and unchanged."""
    bundle = Path(bundle)
    meta = bundle / BUNDLE_JSON
    if not bundle.is_dir():
        raise InputError(bundle, "no such bundle folder (make one with `radpath bundle export`)")
    if not meta.is_file():
        raise InputError(meta, "missing: not a radpath bundle (made by `radpath bundle export`)")
    try:
        spec = json.loads(meta.read_text())
    except (OSError, ValueError) as e:
        raise InputError(meta, f"not readable JSON ({e})") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT:
        raise InputError(meta, f"not a radpath bundle (format {spec.get('format') if isinstance(spec, dict) else None!r})")
    if spec.get("format_version") != FORMAT_VERSION:
        raise InputError(meta, f"bundle format version {spec.get('format_version')!r}; this radpath_fs reads "
                               f"version {FORMAT_VERSION}: re-export the bundle with `radpath bundle export`")
    if list(spec.get("classes", [])) != list(CLASSES):
        raise InputError(meta, f"classes {spec.get('classes')} differ from {list(CLASSES)}")
    for rel, f in spec["files"].items():
        path = bundle / rel
        if not path.is_file():
            raise InputError(path, "missing from the bundle (bundle.json lists it); re-export the bundle")
        if path.stat().st_size != f["bytes"] or sha256_file(path) != f["sha256"]:
            raise InputError(path, "differs from the file bundle.json lists (size or SHA-256); the bundle is "
                                   "damaged, re-export it")
    return spec
