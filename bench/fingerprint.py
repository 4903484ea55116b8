"""What the reference cache key costs per sDPO step: hashing a model directory (what every rank
did before issue 15) vs reading the manifest written next to an exported M_t.

    python bench/fingerprint.py [--mb 256]

Writes a random float32 model (about --mb MB of blocks plus ~260 MB of embeddings) with save_state_dict(manifest=True) to a temp
dir, then times hash_weights (sha256 of the files) and read_manifest, and extrapolates the
hash to SOLAR-10.7B's 43 GB float32 export at the measured rate.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sdpo.models.checkpoint import hash_weights, read_manifest, save_state_dict  # noqa: E402
from sdpo.models.model import ModelConfig, Transformer  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=int, default=256)
    args = ap.parse_args()
    layers = max(1, round(args.mb * 1e6 / 4 / (12 * 1024 * 1024)))  # ~12 H² parameters per block at H=1024
    cfg = ModelConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=layers,
                      num_attention_heads=8)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in Transformer(cfg).state_dict().items()}
    state = {k: torch.randn(s) for k, s in shapes.items()}
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "M1"
        t0 = time.perf_counter()
        save_state_dict(state, cfg, out, manifest=True, max_shard_size="1GB")
        write_s = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
        t0 = time.perf_counter()
        hash_weights(out)
        hash_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert read_manifest(out) is not None
        manifest_s = time.perf_counter() - t0
    rate = size / hash_s
    print(f"| model files | export (incl. manifest) | hash_weights | read_manifest | hash of 43 GB at this rate |")
    print(f"| --- | --- | --- | --- | --- |")
    print(f"| {size / 1e6:.0f} MB | {write_s:.2f} s | {hash_s:.2f} s ({rate / 1e9:.2f} GB/s) | "
          f"{manifest_s * 1e3:.2f} ms | {43e9 / rate:.0f} s per rank per step |")


if __name__ == "__main__":
    main()
