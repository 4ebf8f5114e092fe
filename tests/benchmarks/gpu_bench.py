"""`make bench-gpu`: the GPU benchmarks in one self-contained run (synthetic data made on the spot).

Each part measures the pipeline end to end against the bare model measured in the same process:
  embed  tiles.zarr -> embeddings.zarr vs the bare EfficientNet-b0 forward      (issue 4, >= 0.7x bf16)
  mil    finetune training tiles/s from tiles.zarr vs the bare train step        (issue 5, >= 0.7x)
  mri    DenseNet169-3D training volumes/s from mri.zarr vs the bare train step  (issue 6, >= 0.7x)
Results go to OUT/gpu_bench.json (and are printed). Run: python tests/benchmarks/gpu_bench.py --out DIR
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

PARTS = ("embed", "mil", "mri")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", default="bench-results")
    ap.add_argument("--parts", default=",".join(PARTS))
    ap.add_argument("--device", default="cuda")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import torch

    results: dict = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
    }
    failed = False
    for part in args.parts.split(","):
        t0 = time.perf_counter()
        try:
            module = importlib.import_module(f"gpu_{part}")
            results[part] = module.run(out / part, device=args.device)
        except Exception:  # one part failing must not cost the others' figures
            failed = True
            results[part] = {"error": traceback.format_exc()}
        results[part]["wall_s"] = round(time.perf_counter() - t0, 1)
        print(json.dumps({part: results[part]}, indent=2, default=str), flush=True)
        (out / "gpu_bench.json").write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
