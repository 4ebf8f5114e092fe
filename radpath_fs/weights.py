"""Embedder weights: fetched once through timm's hub, pinned by SHA-256, checked offline.

- `fetch(tag, out)` (`radpath weights fetch NAME[.TAG] --out DIR`, on a machine with internet
  access): builds the timm model with its pretrained weights and writes ``DIR/<name>.safetensors``
  and, beside it, ``DIR/<name>.json``: the file's SHA-256, the source tag, timm's pretrained config
  (mean, std, input size, interpolation) and the licence as timm states it. That JSON is the pin.
- `verify_pin(path, tag)`: a fetched file against its pin (`radpath weights check` reports it,
  through `embedders.check_file`).
- `check_weights(cfg)`: before any work, an embedder's weights are said (a file, `random`, or
  `pretrained`), and a fetched file (`embed.weights_tag`) is present and matches its pin.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import os
from pathlib import Path

from radpath_fs.config import EmbedConfig
from radpath_fs.errors import ConfigError, InputError, RadpathError

PRETRAINED_KEYS = ("mean", "std", "input_size", "interpolation", "crop_pct", "crop_mode")

_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 of a file, hex; remembered while its size and mtime are unchanged."""
    p = Path(path)
    try:
        st = p.stat()
    except OSError:
        raise InputError(p, "file not found") from None
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _DIGESTS[key] = h.hexdigest()
    return _DIGESTS[key]


def pin_path(weights: Path) -> Path:
    return weights.with_suffix(".json")


def fetch_command(tag: str, out: Path) -> str:
    return f"radpath weights fetch {tag} --out {out}"


def _pretrained_cfg(tag: str):
    import timm

    name = tag.split(".")[0]
    if not timm.is_model(name):
        raise ConfigError(f"{tag!r}: {name} is not a timm model")
    try:
        cfg = timm.models.get_pretrained_cfg(tag)
    except RuntimeError:  # timm's word for a tag the model does not have
        cfg = None
    if cfg is None:
        raise ConfigError(f"{tag!r}: timm has no pretrained weights of that tag; "
                          f"`python -c \"import timm; print(timm.list_pretrained('{name}*'))\"` lists them")
    return cfg


def _own_preset(tag: str):
    """The preset `tag` names, where its weights are fetched under its own name: a preset with
    weights that is not also a timm model (those are fetched by timm tag, e.g. efficientnet_b0.ra_in1k)."""
    import timm

    from radpath_fs.presets import PRESETS

    preset = PRESETS.get(tag)
    return preset if preset is not None and preset.hub_id and not timm.is_model(tag) else None


def _gated(error: BaseException) -> bool:
    """Whether the hub refused the download because the repository is gated (timm may wrap its error)."""
    from huggingface_hub.errors import GatedRepoError

    while error is not None:
        if isinstance(error, GatedRepoError):
            return True
        error = error.__cause__ or error.__context__
    return False


def fetch(tag: str, out: str | os.PathLike) -> Path:
    """Download `tag`'s weights through timm and its hub; write them and their pin to `out`. Returns the file.

    `tag`: a timm tag (NAME.TAG), or a preset (`uni`, `resnet50_trunc`) fetched from its `hub_id`
    with its own architecture and arguments; the file, ``<preset>.safetensors``, holds the timm
    model's keys (for a truncated model, only the layers it keeps).
    """
    import timm
    from safetensors.torch import save_file

    preset = _own_preset(tag)
    if preset is not None:
        name, full, licence = tag, tag, preset.licence
        repo = (preset.hub_id.removeprefix("hf-hub:") if preset.hub_id.startswith("hf-hub:")
                else _pretrained_cfg(preset.hub_id).hf_hub_id)
        # The timm model alone (no read-out): its keys are the ones `create_embedder` loads.
        arch, kwargs = preset.timm_args(pretrained=True)
        build = functools.partial(timm.create_model, arch, pretrained=True, num_classes=0, **kwargs)
    else:
        cfg = _pretrained_cfg(tag)
        name, repo, licence = cfg.architecture, cfg.hf_hub_id, cfg.license
        full = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
        build = functools.partial(timm.create_model, full, pretrained=True)
    try:
        model = build()
    except Exception as e:  # the hub raises its own errors (offline, not found, HTTP); one line says which
        if _gated(e):
            raise RadpathError(
                f"{full}: the weights at https://huggingface.co/{repo} are gated. Request access on that page "
                "(signed in), then set HF_TOKEN to a token of that account and fetch again; or download the "
                f"weights there and set embed.weights to the file (`radpath weights check FILE --embedder {name}` "
                "checks that it fits)") from None
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise RadpathError(f"{full}: timm could not fetch the weights ({type(e).__name__}: {first})") from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.safetensors"
    tmp = path.with_name(f".{path.name}.tmp")
    # Clones: safetensors refuses tensors that share memory.
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    info = dict(getattr(model, "pretrained_cfg", None) or {})
    record = {
        "file": path.name,
        "sha256": sha256_file(path),
        "bytes": path.stat().st_size,
        "tag": full,
        "hf_hub_id": repo,
        "pretrained_cfg": {k: info[k] for k in PRETRAINED_KEYS if k in info},
        "license": licence,
        "timm_version": timm.__version__,
        "fetched": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    pin_path(path).write_text(json.dumps(record, indent=2) + "\n")
    return path


def _read_pin(pin: Path, remedy: str) -> dict:
    try:
        record = json.loads(pin.read_text())
    except FileNotFoundError:
        raise InputError(pin, f"the pin of the weights file is missing; {remedy}") from None
    except (OSError, ValueError) as e:
        raise InputError(pin, f"unreadable pin ({e}); {remedy}") from None
    if not isinstance(record, dict) or not isinstance(record.get("sha256"), str):
        raise InputError(pin, f"not a pin written by `radpath weights fetch` (no sha256); {remedy}")
    return record


def verify_pin(path: Path, tag: str | None) -> dict:
    """The pin of a fetched weights file, after checking the file against it (and its tag against `tag`)."""
    pin = pin_path(path)

    def remedy(again: bool = False, source: str | None = tag) -> str:
        return (f"fetch it {'again' if again else 'once'} on a machine with internet access: "
                f"{fetch_command(source or '<tag>', path.parent)}")

    if not path.is_file():
        raise InputError(path, f"weights file not found; {remedy()}")
    record = _read_pin(pin, remedy())
    if tag is not None and record.get("tag") != tag:
        raise InputError(pin, f"pins weights of {record.get('tag')!r}, and embed.weights_tag is {tag!r}; {remedy()}")
    digest = sha256_file(path)
    if digest != record["sha256"]:
        raise InputError(path, f"sha256 {digest} does not match its pin {record['sha256']} ({pin}); "
                               f"{remedy(True, tag or record.get('tag'))}")
    return record


def _fetch_tag(name: str) -> str:
    """What `radpath weights fetch` takes for embedder `name`: a preset fetched under its own name,
    else a tag of the timm model."""
    return name if _own_preset(name) is not None else f"{name}.<tag>"


def check_weights(cfg: EmbedConfig) -> None:
    """Refuse, before any work, an embedder whose weights are unsaid, missing or not the pinned file."""
    if cfg.weights is None and not cfg.pretrained:
        raise ConfigError(
            f"embed.weights is not set: name a weights file ({fetch_command(_fetch_tag(cfg.name), Path('weights'))} "
            "fetches the published ones), or say `random` (--weights random) for random weights")
    if cfg.weights_tag is not None:
        verify_pin(cfg.weights_file, cfg.weights_tag)
    elif cfg.weights_file is not None and not cfg.weights_file.is_file():
        raise InputError(cfg.weights_file, "weights file not found (embed.weights)")

