"""Stage two for slides: the pooled-head MIL classifier and its trainer (`radpath train-wsi`).

A slide is a bag of tiles. The pooled head concatenates the max and the mean of the tile
embeddings (2L), then dropout, an optional stack of (linear, ReLU, batch norm), and a linear
layer to the three class logits. `MILClassifier(embedder, head)` is one module over bags of any
size; with `nn.Identity` as embedder it is the head alone, fed cached embeddings.

Two training modes per magnification and fold, same head, loss and sampling (batches of
`slides_per_batch` slides x `tiles_per_slide` random tiles, cross-entropy weighted by inverse
class frequency, Adam):
- ``finetune`` (the paper's): end to end from the tile pixels in tiles.zarr, with a random crop
  and per-tile colour jitter; tiles are read by a thread pool a few batches ahead of the GPU;
- ``head``: from the cached embeddings in embeddings.zarr, every bag held in memory as a tensor
  (seconds on a CPU).

Inference over a bag never holds more than one chunk of tiles: the embedder runs chunk by chunk
and the pooling keeps a running max and sum per bag (`BagPool`), so a 10,000-tile bag costs the
memory of one chunk.

Every epoch's randomness is drawn from generators seeded by (seed, epoch), and the run goes
through `radpath_fs.training.TrainingRun` (snapshots, history, resumable state after every
epoch): a resumed run gives the same bytes as an uninterrupted one on the CPU.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch import nn

from radpath_fs import CLASSES
from radpath_fs.errors import RadpathError, StoreError
from radpath_fs.folds import fold_cases
from radpath_fs.layout import EMBEDDINGS, TILES, model_dir, model_weights_path
from radpath_fs.metrics import balanced_accuracy, encode_labels
from radpath_fs.progress import info, progress_bar, warn
from radpath_fs.store import Store, mag_key
from radpath_fs.training import (
    Runtime,
    TrainingRun,
    class_weighted_loss,
    config_json,
    cpu_threads,
    fingerprint_hash,
    load_checkpoint,
    resolve_device,
    seed_everything,
    train_step,
    wsi_run_id,
)
from radpath_fs.weights import check_weights

N_CLASSES = len(CLASSES)
MODES = ("finetune", "head")


# ---- the model ---------------------------------------------------------------------------------


class PooledHead(nn.Module):
    """[max over tiles || mean over tiles] (2L) -> dropout -> (linear, ReLU, BatchNorm1d)* -> linear.

    Buffers `feature_mean`/`feature_std` (L,) standardise the pooled features (identity unless
    `set_standardization` is called). Standardising each tile's features is an increasing affine
    map per feature, so it commutes with max and mean and is applied to the pooled vector.
    """

    def __init__(self, in_features: int, n_classes: int = N_CLASSES, hidden: Sequence[int] = (), dropout: float = 0.5):
        super().__init__()
        self.in_features = int(in_features)
        self.n_classes = int(n_classes)
        self.hidden = [int(h) for h in hidden]
        self.dropout = float(dropout)
        layers: list[nn.Module] = [nn.Dropout(self.dropout)]
        width = 2 * self.in_features
        for h in self.hidden:
            layers += [nn.Linear(width, h), nn.ReLU(), nn.BatchNorm1d(h)]
            width = h
        layers.append(nn.Linear(width, self.n_classes))
        self.classifier = nn.Sequential(*layers)
        self.register_buffer("feature_mean", torch.zeros(self.in_features))
        self.register_buffer("feature_std", torch.ones(self.in_features))

    def config(self) -> dict:
        return {"in_features": self.in_features, "n_classes": self.n_classes, "hidden": self.hidden,
                "dropout": self.dropout}

    def set_standardization(self, mean: torch.Tensor, std: torch.Tensor, eps: float = 1e-6) -> None:
        self.feature_mean.copy_(mean)
        self.feature_std.copy_(torch.clamp(std, min=eps))

    @staticmethod
    def pool(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """(B, n, L) embeddings [+ (B, n) bool mask of real tiles] -> (B, 2L) [max || mean]."""
        if x.ndim == 2:
            x = x.unsqueeze(0)
        if x.shape[1] == 0:
            raise ValueError("cannot pool an empty bag (0 tiles)")
        if mask is None:
            return torch.cat([x.amax(dim=1), x.mean(dim=1)], dim=1)
        m = mask.to(torch.bool).unsqueeze(-1)
        count = m.sum(dim=1)
        if bool((count == 0).any()):
            raise ValueError("cannot pool an empty bag (0 tiles)")
        mx = x.masked_fill(~m, float("-inf")).amax(dim=1)
        mean = x.masked_fill(~m, 0.0).sum(dim=1) / count.to(x.dtype)
        return torch.cat([mx, mean], dim=1)

    @staticmethod
    def pool_segments(emb: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Flat (sum n_i, L) embeddings of consecutive bags of `sizes` -> (B, 2L)."""
        sizes = [int(s) for s in sizes]
        if len(set(sizes)) == 1:
            return PooledHead.pool(emb.view(len(sizes), sizes[0], emb.shape[-1]))
        bags = torch.split(emb, sizes)
        padded = nn.utils.rnn.pad_sequence(bags, batch_first=True)
        mask = torch.arange(padded.shape[1], device=emb.device)[None, :] < torch.tensor(sizes, device=emb.device)[:, None]
        return PooledHead.pool(padded, mask)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        mean, std = self.feature_mean.repeat(2), self.feature_std.repeat(2)
        return self.classifier((pooled - mean) / std)

    def forward(self, x: torch.Tensor | Sequence[torch.Tensor], mask: torch.Tensor | None = None) -> torch.Tensor:
        """Bags as a (B, n, L) tensor with an optional mask, one (n, L) bag, or a list of (n_i, L)."""
        if isinstance(x, (list, tuple)):
            return self.classify(self.pool_segments(torch.cat(list(x)), [len(b) for b in x]))
        return self.classify(self.pool(x, mask))


class BagPool:
    """Running max / sum / count per bag over a stream of (embeddings, bag ids) chunks."""

    def __init__(self, n_bags: int, features: int, device: torch.device | str = "cpu"):
        self.max = torch.full((n_bags, features), float("-inf"), dtype=torch.float32, device=device)
        self.sum = torch.zeros((n_bags, features), dtype=torch.float32, device=device)
        self.count = torch.zeros((n_bags,), dtype=torch.float32, device=device)

    def update(self, emb: torch.Tensor, bag_ids: torch.Tensor) -> None:
        """Add a chunk of embeddings (k, L) of bags `bag_ids` (k,), each bag's tiles in one or more runs."""
        emb = emb.to(torch.float32)
        bags, counts = torch.unique_consecutive(bag_ids.cpu(), return_counts=True)
        for b, run in zip(bags.tolist(), torch.split(emb, counts.tolist()), strict=True):
            torch.maximum(self.max[b], run.amax(0), out=self.max[b])
            self.sum[b] += run.sum(0)
            self.count[b] += len(run)

    def pooled(self) -> torch.Tensor:
        if bool((self.count == 0).any()):
            raise ValueError("cannot pool an empty bag (0 tiles)")
        return torch.cat([self.max, self.sum / self.count[:, None]], dim=1)


class MILClassifier(nn.Module):
    """embedder (tiles -> (k, L)) + pooled head, over bags of any size.

    The embedder is a timm model (num_classes=0) for end-to-end training, or `nn.Identity` when
    the inputs are cached embeddings.
    """

    def __init__(self, embedder: nn.Module, head: PooledHead):
        super().__init__()
        self.embedder = embedder
        self.head = head

    def embed(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.embedder(tiles)

    def forward_flat(self, tiles: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Tiles of consecutive bags stacked (sum n_i, ...) -> (B, n_classes) logits."""
        return self.head.classify(self.head.pool_segments(self.embed(tiles), sizes))

    def forward(self, bags: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
        """A list of bags (n_i, ...) or a (B, n, ...) tensor of equal-sized bags -> (B, n_classes)."""
        if isinstance(bags, (list, tuple)):
            return self.forward_flat(torch.cat(list(bags)), [len(b) for b in bags])
        b, n = bags.shape[:2]
        return self.forward_flat(bags.flatten(0, 1), [n] * b)

    @torch.no_grad()
    def predict_stream(
        self, chunks: Iterable[tuple[torch.Tensor, torch.Tensor]], n_bags: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Logits (n_bags, n_classes) from a stream of (model-ready tiles, bag ids) chunks.

        Memory is one chunk plus (n_bags, 2L) accumulators, whatever the bag sizes.
        """
        rt = Runtime(device, spatial_dims=2)
        pool: BagPool | None = None
        for x, ids in chunks:
            with rt.autocast():
                emb = self.embed(x.to(rt.device, non_blocking=True))
            if pool is None:
                pool = BagPool(n_bags, emb.shape[-1], rt.device)
            pool.update(emb, ids)
        if pool is None:
            raise ValueError("no tiles to predict from")
        return self.head.classify(pool.pooled()).float()

    @torch.no_grad()
    def predict_bag(
        self,
        tiles,
        chunk_size: int = 1024,
        transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
        device: torch.device | str = "cpu",
    ) -> torch.Tensor:
        """Logits (n_classes,) of one bag of any size, read `chunk_size` tiles at a time.

        `tiles` is anything sliceable with a shape: a tensor, a numpy array, a zarr array (only
        the chunk in hand is ever read into memory). `transform` maps a raw chunk to model input.
        """
        n = int(tiles.shape[0])
        if n == 0:
            raise ValueError("cannot classify an empty bag (0 tiles)")

        def chunks():
            for start in range(0, n, chunk_size):
                x = torch.as_tensor(np.asarray(tiles[start : start + chunk_size]))
                x = x.to(device) if transform is None else transform(x.to(device))
                yield x, torch.zeros(len(x), dtype=torch.long)

        return self.predict_stream(chunks(), 1, device)[0]


# ---- bag sources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Tiles `index` of case number `case` (in the source's order), feeding bag `bag`."""

    case: int
    index: np.ndarray
    bag: int = 0


class EmbeddingBags:
    """Cached embeddings of every case, held in memory (float16 as stored) for head mode."""

    kind = "embeddings"

    def __init__(self, store: Store, embedder_id: str, case_ids: Sequence[str], magnification: float):
        from radpath_fs.embeddings import embedding_inputs, read_embeddings

        self.case_ids = list(case_ids)
        self.bags = []
        with progress_bar(f"reading embeddings at {mag_key(magnification)}x", len(self.case_ids)) as advance:
            for c in self.case_ids:
                self.bags.append(torch.from_numpy(np.asarray(read_embeddings(store, embedder_id, c, magnification))))
                advance()
        self.features = int(self.bags[0].shape[1]) if self.bags else 0
        # The transform the embeddings were made with (normalisation statistics included) and the
        # embedder's batch-norm calibration: a head is only valid on embeddings made the same way,
        # which prediction checks.
        made = next(iter(embedding_inputs(store, embedder_id, self.case_ids, magnification).values()), {})
        self.transform, self.calibration = made.get("transform"), made.get("calibration")

    def n_tiles(self, i: int) -> int:
        return int(self.bags[i].shape[0])

    def read(self, seg: Segment) -> torch.Tensor:
        return self.bags[seg.case][torch.from_numpy(seg.index)]

    def empty(self, n: int, pin: bool) -> torch.Tensor:
        return torch.empty((n, self.features), dtype=torch.float32, pin_memory=pin)

    def feature_stats(self, cases: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-feature mean and std over every tile of these cases (float64 sums)."""
        n, s, ss = 0, torch.zeros(self.features, dtype=torch.float64), torch.zeros(self.features, dtype=torch.float64)
        for i in cases:
            x = self.bags[i].to(torch.float64)
            n, s, ss = n + len(x), s + x.sum(0), ss + (x * x).sum(0)
        mean = s / max(n, 1)
        return mean.float(), (ss / max(n, 1) - mean * mean).clamp(min=0).sqrt().float()


class TileBags:
    """Tile pixels from tiles.zarr, read on demand (uint8 (k, T, T, 3)) for end-to-end training."""

    kind = "tiles"

    def __init__(self, store: Store, case_ids: Sequence[str], magnification: float):
        from radpath_fs.tilestore import tile_count, tile_group_attrs

        self.store = store
        self.case_ids = list(case_ids)
        self.magnification = float(magnification)
        self.counts = [tile_count(store, c, magnification) for c in self.case_ids]
        sizes = {int(tile_group_attrs(store, c, magnification)["tile_size"]) for c in self.case_ids}
        if len(sizes) > 1:
            raise StoreError(f"{store.path(TILES)}: tiles of several sizes {sorted(sizes)} at "
                             f"magnification {mag_key(magnification)}; re-tile with one tile_size")
        self.tile_size = sizes.pop() if sizes else 0

    def n_tiles(self, i: int) -> int:
        return self.counts[i]

    def read(self, seg: Segment) -> torch.Tensor:
        from radpath_fs.tilestore import read_tiles

        # A damaged chunk is a StoreError naming the slide's group.
        return torch.from_numpy(read_tiles(self.store, self.case_ids[seg.case], self.magnification, seg.index))

    def empty(self, n: int, pin: bool) -> torch.Tensor:
        t = self.tile_size
        return torch.empty((n, t, t, 3), dtype=torch.uint8, pin_memory=pin)


class Loader:
    """Reads batches of segments a few batches ahead, each segment by a worker thread.

    Each batch is one buffer (pinned on CUDA) that the workers fill in place, so the main thread
    only launches the copy to the device. The order of batches and of tiles is the plan's order,
    whatever the threads do: the loader adds no randomness.
    """

    def __init__(self, source, *, threads: int, depth: int, pin: bool):
        self.source = source
        self.depth = max(1, depth)
        self.pin = pin
        # In-memory embeddings are a gather; threads would only add overhead there.
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="radpath-tiles") if (
            threads > 0 and source.kind == "tiles") else None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _fill(self, buf: torch.Tensor, offset: int, seg: Segment) -> None:
        x = self.source.read(seg)
        buf[offset : offset + len(x)] = x

    def _start(self, plan: Sequence[Segment]):
        total = sum(len(s.index) for s in plan)
        buf = self.source.empty(total, self.pin)
        futures: list[Future] = []
        offset = 0
        for seg in plan:
            if self.pool is None:
                self._fill(buf, offset, seg)
            else:
                futures.append(self.pool.submit(self._fill, buf, offset, seg))
            offset += len(seg.index)
        return buf, futures

    def iterate(self, plans: Iterable[Sequence[Segment]]) -> Iterator[tuple[Sequence[Segment], torch.Tensor]]:
        pending: list = []
        it = iter(plans)
        exhausted = False
        while True:
            while not exhausted and len(pending) < self.depth:
                try:
                    plan = next(it)
                except StopIteration:
                    exhausted = True
                    break
                pending.append((plan, *self._start(plan)))
            if not pending:
                return
            plan, buf, futures = pending.pop(0)
            for f in futures:
                f.result()  # re-raises a worker's error (TileBags.read names the slide's group)
            yield plan, buf


# ---- inference over bags ----------------------------------------------------------------------


def chunk_plans(bags: Sequence[Segment], chunk_tiles: int) -> Iterator[list[Segment]]:
    """Cut a list of bags into chunks of at most `chunk_tiles` tiles (a big bag spans chunks)."""
    plan: list[Segment] = []
    room = chunk_tiles
    for seg in bags:
        start = 0
        while start < len(seg.index):
            take = min(room, len(seg.index) - start)
            plan.append(Segment(seg.case, seg.index[start : start + take], seg.bag))
            start += take
            room -= take
            if room == 0:
                yield plan
                plan, room = [], chunk_tiles
    if plan:
        yield plan


def infer_bags(
    model: MILClassifier,
    loader: Loader,
    bags: Sequence[Segment],
    *,
    transform: Callable[..., torch.Tensor] | None,
    generator: torch.Generator | None,
    device: torch.device,
    chunk_tiles: int,
    advance: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits (len(bags), n_classes) of each bag, in eval mode, streaming chunks of tiles."""
    if not bags:
        return np.zeros((0, N_CLASSES), dtype=np.float32)
    was_training = model.training
    model.eval()

    def chunks():
        for plan, buf in loader.iterate(chunk_plans(bags, chunk_tiles)):
            x = buf.to(device, non_blocking=True)
            if transform is not None:
                # Only the random (train) transform draws from the generator.
                x = transform(x, generator=generator) if getattr(transform, "kind", "") == "train" else transform(x)
            ids = torch.cat([torch.full((len(s.index),), s.bag, dtype=torch.long) for s in plan])
            yield x, ids
            if advance is not None:
                advance(len(ids))

    try:
        return model.predict_stream(chunks(), len(bags), device).cpu().numpy().astype(np.float32)
    finally:
        model.train(was_training)


# ---- training ----------------------------------------------------------------------------------


def epoch_seeds(seed: int, epoch: int, stream: int = 0) -> tuple[np.random.Generator, int]:
    """A numpy generator and a torch seed for one epoch, independent of every other epoch."""
    ss = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)])
    a, b = ss.spawn(2)
    return np.random.default_rng(a), int(b.generate_state(1, dtype=np.uint64)[0] & ((1 << 63) - 1))


def loader_threads(cfg_threads: int | None) -> int:
    return cfg_threads if cfg_threads is not None else min(16, os.cpu_count() or 1)


def _select_cases(store: Store, magnification: float, fold: int, source_ok: Callable[[str], bool]):
    """(train case ids, train labels, held-out case ids, held-out labels) with data at this mag."""
    out = []
    for part in fold_cases(store.cases(), fold, "wsi"):
        ok = np.array([source_ok(c) for c in part["case_id"]], dtype=bool)
        skipped = sorted(part.loc[~ok, "case_id"])
        if skipped:
            warn(f"{len(skipped)} case(s) have no tiles at magnification {mag_key(magnification)} and are "
                 f"left out: {', '.join(skipped[:5])}{' ...' if len(skipped) > 5 else ''}")
        out += [part.loc[ok, "case_id"].tolist(), part.loc[ok, "label"].tolist()]
    if not out[0]:
        raise RadpathError(f"no training case has tiles at magnification {mag_key(magnification)}; "
                           "run `radpath tile` (and `radpath embed` for head mode) first")
    return out


def _embedding_available(store: Store, embedder_id: str, magnification: float) -> Callable[[str], bool]:
    from radpath_fs.embeddings import embedding_count, embedding_is_complete

    def ok(case_id: str) -> bool:
        if embedding_is_complete(store, embedder_id, case_id, magnification):
            return embedding_count(store, embedder_id, case_id, magnification) > 0
        if store.group_is_complete(TILES, f"{case_id}/{mag_key(magnification)}"):
            raise StoreError(
                f"{store.path(EMBEDDINGS, embedder_id, case_id, mag_key(magnification))}: no complete "
                f"embeddings for a tiled case; run `radpath embed` first"
            )
        return False

    return ok


def _tiles_available(store: Store, magnification: float) -> Callable[[str], bool]:
    from radpath_fs.tilestore import tile_count

    def ok(case_id: str) -> bool:
        if not store.group_is_complete(TILES, f"{case_id}/{mag_key(magnification)}"):
            return False
        return tile_count(store, case_id, magnification) > 0

    return ok


def build_transforms(cfg_wsi, mean, std):
    """(train transform, eval transform) of the slide models: the recipe's crop, jitter and stats."""
    from radpath_fs.transforms import eval_transform, train_transform

    train = train_transform(cfg_wsi.crop_size, cfg_wsi.color_jitter, mean=mean, std=std)
    evaluate = eval_transform(None, mean=mean, std=std, size=cfg_wsi.crop_size, crop="center")
    return train, evaluate


class WSIRun:
    """What makes a training run the run it is (magnification, fold, mode, settings, case lists,
    inputs) and its `TrainingRun` in the store. Cheap: the cases table and array metadata are
    read, no embedding or tile, so whether the snapshots are up to date is known before any loading."""

    def __init__(self, store: Store, cfg, magnification: float, fold: int, mode: str, weights: Path | None):
        if mode not in MODES:
            raise RadpathError(f"--mode {mode!r}: expected one of {', '.join(MODES)}")
        self.store, self.cfg, self.w = store, cfg, cfg.wsi
        self.magnification, self.fold, self.mode = float(magnification), int(fold), mode

        from radpath_fs.embedders import embedder_id, weights_hash

        embed_cfg = cfg.embed
        if mode == "finetune" and weights is not None:
            embed_cfg = embed_cfg.model_copy(update={"weights": Path(weights), "weights_tag": None})
        elif mode == "head" and weights is not None:
            warn("--weights is for finetune mode; head mode reads the embeddings cached by `radpath embed`")
        self.embed_cfg = embed_cfg
        self.embedder_id = embedder_id(embed_cfg)
        self.weights_hash = weights_hash(embed_cfg.weights_file)

        available = (_embedding_available(store, self.embedder_id, magnification) if mode == "head"
                     else _tiles_available(store, magnification))
        self.train_ids, self.train_labels, self.val_ids, self.val_labels = _select_cases(
            store, magnification, fold, available)
        self.training = TrainingRun(store, wsi_run_id(magnification, fold), self.w.epochs, self.w.snapshot_epochs(),
                                    fingerprint_hash(self._fingerprint()), lr=self.w.lr,
                                    lr_schedule=self.w.lr_schedule)

    @property
    def run_id(self) -> str:
        return self.training.run_id

    @property
    def model_ids(self) -> list[str]:
        return self.training.model_ids

    def _inputs_made_from(self) -> str:
        """A hash of what the cases' inputs were made from: each embedding array's transform
        (normalisation statistics included) and embedder calibration in head mode, each tile
        group's content fingerprint in finetune mode. Re-tiled slides or re-embedded cases make
        another run."""
        from radpath_fs.embeddings import embedding_inputs
        from radpath_fs.normstats import source_fingerprint

        ids = self.train_ids + self.val_ids
        if self.mode == "head":
            made = embedding_inputs(self.store, self.embedder_id, ids, self.magnification)
        else:
            made = {c: source_fingerprint(self.store, c, self.magnification) for c in ids}
        return fingerprint_hash(made)

    def _fingerprint(self) -> dict:
        # Loader threads and prefetch depth change no result; the folds and magnifications trained
        # and the mode are the run's own fields.
        wsi = {k: v for k, v in config_json(self.w).items()
               if k not in ("loader_threads", "prefetch_batches", "magnifications", "folds", "mode")}
        return {
            "magnification": self.magnification, "fold": self.fold, "mode": self.mode, "seed": self.cfg.seed,
            "wsi": wsi, "embedder_id": self.embedder_id, "weights_hash": self.weights_hash,
            "train_cases": self.train_ids, "val_cases": self.val_ids, "labels": self.train_labels + self.val_labels,
            "inputs": self._inputs_made_from(),
        }


class WSITrainer:
    """One training run (`WSIRun`), loaded and ready to train: `fit()` runs it to the end."""

    def __init__(self, run: WSIRun, device: torch.device):
        from radpath_fs.embedders import create_embedder, embedding_width
        from radpath_fs.normstats import normalization_stats

        self.run = run
        self.rt = Runtime(device, spatial_dims=2)
        w, embed_cfg, mag, head_mode = run.w, run.embed_cfg, run.magnification, run.mode == "head"
        self.train_y, self.val_y = encode_labels(run.train_labels), encode_labels(run.val_labels)
        all_ids = run.train_ids + run.val_ids
        self.source = (EmbeddingBags(run.store, run.embedder_id, all_ids, mag) if head_mode
                       else TileBags(run.store, all_ids, mag))

        seed_everything(run.cfg.seed)  # weight initialisation
        if head_mode:
            embedder: nn.Module = nn.Identity()
            features = self.source.features
            self.mean = self.std = None
            self.train_tf = self.eval_tf = None
        else:
            embedder = create_embedder(embed_cfg.name, weights=embed_cfg.weights_file, pretrained=embed_cfg.pretrained,
                                       seed=embed_cfg.seed)
            features = embedding_width(embedder)
            # Per magnification, as the embeddings of `radpath embed` are normalised.
            self.mean, self.std = normalization_stats(run.store, embed_cfg, [mag])
            self.train_tf, self.eval_tf = (t.to(device) for t in build_transforms(w, self.mean, self.std))
        self.head = PooledHead(features, N_CLASSES, w.head.hidden, w.head.dropout)
        self.standardized = head_mode and w.head.standardize
        if self.standardized:
            self.head.set_standardization(*self.source.feature_stats(range(len(run.train_ids))))
        self.model = self.rt.prepare(MILClassifier(embedder, self.head))
        if self.rt.cuda:
            torch.backends.cudnn.benchmark = True  # fixed batch shapes: pick the fastest kernels once
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=w.lr, weight_decay=w.weight_decay)
        weights_ce, self.loss_fn = class_weighted_loss(run.train_labels, w.class_weighting, device)
        self.class_weights = weights_ce.tolist()
        self.loader = Loader(self.source, threads=loader_threads(w.loader_threads), depth=w.prefetch_batches,
                             pin=self.rt.cuda)

    def model_config(self, epoch: int) -> dict:
        run, head_mode = self.run, self.run.mode == "head"
        return {
            "modality": "wsi",
            "magnification": run.magnification,
            "fold": run.fold,
            "snapshot": int(epoch),
            "run_id": run.run_id,
            "mode": run.mode,
            "seed": run.cfg.seed,
            "embedder": {"name": run.embed_cfg.name, "id": run.embedder_id, "weights": (
                str(run.embed_cfg.weights) if run.embed_cfg.weights else None),
                "weights_hash": run.weights_hash, "pretrained": run.embed_cfg.pretrained},
            "normalization": None if self.mean is None else {"mean": self.mean, "std": self.std,
                                                             "kind": run.embed_cfg.normalization},
            "head": {**self.head.config(), "standardized": self.standardized},
            "embedding_transform": self.source.transform if head_mode else None,
            "embedding_calibration": self.source.calibration if head_mode else None,
            "class_weights": self.class_weights,
            "classes": list(CLASSES),
            "train_cases": run.train_ids,
            "wsi": config_json(run.w),
            "embed": config_json(run.embed_cfg),
        }

    # -- one epoch ----------------------------------------------------------------------------------
    def epoch_plans(self, rng: np.random.Generator) -> list[list[Segment]]:
        """Batches of slides_per_batch slides x tiles_per_slide random tiles (all, when fewer)."""
        w = self.run.w
        order = rng.permutation(len(self.run.train_ids))
        n_batches = -(-len(order) // w.slides_per_batch)
        # Near-equal batches: a last batch of one slide would break batch norm and skew the step.
        plans = []
        for part in np.array_split(order, n_batches):
            plan = []
            for i in part:
                n = self.source.n_tiles(int(i))
                k = min(w.tiles_per_slide, n)
                idx = np.sort(rng.choice(n, size=k, replace=False))
                plan.append(Segment(int(i), idx, len(plan)))
            plans.append(plan)
        return plans

    def train_epoch(self, epoch: int, max_batches: int | None = None) -> dict:
        rng, torch_seed = epoch_seeds(self.run.cfg.seed, epoch)
        torch.manual_seed(torch_seed)  # dropout
        gen = torch.Generator().manual_seed(torch_seed)  # augmentation, drawn on the CPU
        plans = self.epoch_plans(rng)[:max_batches]
        with progress_bar(f"{self.run.run_id} epoch {epoch + 1}/{self.run.w.epochs}", len(plans)) as advance:
            return {"epoch": epoch, **self.run_batches(plans, gen, advance)}

    def run_batches(self, plans: Sequence[Sequence[Segment]], generator: torch.Generator | None,
                    advance: Callable[[int], None] | None = None) -> dict:
        """Train on `plans` in order: mean loss, balanced accuracy of the batches' predictions, speed.

        Losses and predictions stay on the device until the end, so the host never waits for
        the GPU inside the loop and queues the next batch while the current one runs.
        """
        self.model.train()
        losses, sizes, labels, preds = [], [], [], []
        tiles = 0
        t0 = time.perf_counter()
        for plan, buf in self.loader.iterate(plans):
            y = torch.from_numpy(self.train_y[[s.case for s in plan]]).to(self.rt.device, non_blocking=True)
            loss, logits = self.step(plan, buf, y, generator)
            losses.append(loss)
            preds.append(logits.argmax(1))
            labels.append(y)
            sizes.append(len(plan))
            tiles += len(buf)
            if advance is not None:
                advance(1)
        losses_np = torch.stack(losses).cpu().numpy() if losses else np.zeros(0)
        y_true = torch.cat(labels).cpu().tolist() if labels else []
        y_pred = torch.cat(preds).cpu().tolist() if preds else []
        seconds = time.perf_counter() - t0
        return {
            "loss": float(np.average(losses_np, weights=sizes)) if sizes else float("nan"),
            "train_balanced_accuracy": balanced_accuracy(y_true, y_pred),
            "seconds": seconds,
            "tiles_per_s": tiles / seconds if seconds > 0 else float("nan"),
        }

    def step(self, plan: Sequence[Segment], buf: torch.Tensor, y: torch.Tensor,
             generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimiser step on one batch (buf: the batch's tiles or embeddings, bag after bag).

        Returns the loss and the logits, detached, on the device.
        """
        x = buf.to(self.rt.device, non_blocking=True)
        if self.train_tf is not None:
            x = self.train_tf(x, generator=generator)
        forward = partial(self.model.forward_flat, sizes=[len(s.index) for s in plan])
        return train_step(forward, self.optimizer, self.loss_fn, x, y, self.rt)

    def validate(self) -> float:
        """Balanced accuracy on the held-out cases: a fixed random subset of tiles, no augmentation."""
        run = self.run
        if not run.val_ids:
            return float("nan")
        rng, _ = epoch_seeds(run.cfg.seed, 0, stream=1)  # the same subsets every epoch
        bags = []
        for j in range(len(run.val_ids)):
            i = len(run.train_ids) + j
            n = self.source.n_tiles(i)
            k = min(run.cfg.predict.tiles_per_slide, n)
            bags.append(Segment(i, np.sort(rng.choice(n, size=k, replace=False)), j))
        logits = infer_bags(self.model, self.loader, bags, transform=self.eval_tf, generator=None,
                            device=self.rt.device, chunk_tiles=run.cfg.predict.batch_tiles)
        return balanced_accuracy(self.val_y.tolist(), logits.argmax(1).tolist())

    def epoch_record(self, epoch: int) -> dict:
        return {**self.train_epoch(epoch), "val_balanced_accuracy": self.validate()}

    # -- the run --------------------------------------------------------------------------------
    def fit(self, resume: bool = True) -> list[str]:
        """Train to the end, after the last epoch of a resumable state (`train_wsi` checks first
        whether there is anything to train); returns the snapshot model ids."""
        run = self.run
        # One bar for the run and one closing line: the per-epoch figures are in history.parquet.
        last = run.training.fit(self.model, self.optimizer, self.epoch_record, self.model_config, resume)[-1]
        info(f"{run.run_id}: {run.mode} on {len(run.train_ids)} slides ({len(run.val_ids)} held out), "
             f"{self.rt.device}; last epoch loss {last['loss']:.4f}, train bal. acc "
             f"{last['train_balanced_accuracy']:.3f}, held-out bal. acc {last['val_balanced_accuracy']:.3f}")
        return run.model_ids


def wsi_is_current(store_url: str | Store, cfg, magnification: float, fold: int, mode: str | None = None) -> bool:
    """Whether `train_wsi` would find nothing to train; cheap (see `WSIRun`), takes no lock."""
    store = store_url if isinstance(store_url, Store) else Store(store_url)
    return WSIRun(store, cfg, magnification, fold, mode or cfg.wsi.mode, None).training.is_current()


def train_wsi(
    store_url: str | Store,
    cfg,
    magnification: float,
    fold: int,
    mode: str | None = None,
    weights: Path | str | None = None,
    device: str = "auto",
    resume: bool = True,
) -> list[str]:
    """`radpath train-wsi`: train one magnification and fold; returns the snapshot model ids."""
    store = store_url if isinstance(store_url, Store) else Store(store_url)
    dev = resolve_device(device)
    mode = mode or cfg.wsi.mode
    if weights is not None and not Path(weights).is_file():
        raise RadpathError(f"--weights {weights}: no such file")
    # The head's tensors are ~100 KB a step: intra-op threads only add synchronisation there
    # (measured 70x slower per gather with 2 threads on a busy 2-core box).
    with store.lock("train-wsi"), cpu_threads(1 if mode == "head" and dev.type == "cpu" else None):
        run = WSIRun(store, cfg, magnification, fold, mode, Path(weights) if weights else None)
        if mode == "finetune":
            check_weights(run.embed_cfg)
            if run.embed_cfg.weights == "random":
                warn("finetuning an embedder from random weights (embed.weights: random): the paper fine-tunes "
                     "ImageNet-pretrained EfficientNet-b0 (`radpath weights fetch efficientnet_b0.ra_in1k --out weights`)")
        if resume and run.training.nothing_to_train():
            return run.model_ids
        trainer = WSITrainer(run, dev)
        try:
            return trainer.fit(resume=resume)
        finally:
            trainer.loader.close()


# ---- loading a trained model ------------------------------------------------------------------


def load_wsi_model(store: Store, model_id: str, device: torch.device) -> tuple[MILClassifier, dict]:
    """Rebuild a slide model from `models/<id>/` (architecture from config.json, weights from safetensors)."""
    state, config = load_checkpoint(store, model_id)
    if config.get("modality") != "wsi":
        raise RadpathError(f"{store.path(model_dir(model_id))}: not a slide model (modality {config.get('modality')!r})")
    if config["mode"] == "head":
        embedder: nn.Module = nn.Identity()
    else:
        from radpath_fs.embedders import create_embedder

        embedder = create_embedder(config["embedder"]["name"], weights=None, pretrained=False)
    h = config["head"]
    model = MILClassifier(embedder, PooledHead(h["in_features"], h["n_classes"], h["hidden"], h["dropout"]))
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise StoreError(f"{store.path(model_weights_path(model_id))}: weights do not fit the "
                         f"architecture in config.json ({str(e).splitlines()[0]})") from None
    return Runtime(device, spatial_dims=2).prepare(model).eval(), config
