"""Worker of the FSDP2 parity tests (tests/test_families.py, tests/test_qwen35.py), under torchrun on gloo:

    torchrun --nproc_per_node 2 tests/fsdp_worker.py [--prompt-step N] MODEL_DIR...

For each model directory: FSDP2 with full activation checkpointing over the ranks, each rank a half of 4
random pairs (prompts 4 + N·i tokens), against one process over all 4; the packed log-probs and every
parameter's gradient must agree. Prints OK."""

import argparse

import torch

from sdpo.data.packing import pack
from sdpo.data.pairs import TokenizedPair
from sdpo.logprobs import packed_forward
from sdpo.models.checkpoint import load_model
from sdpo.runtime.distributed import apply_fsdp, build_mesh, destroy, init_distributed

ap = argparse.ArgumentParser()
ap.add_argument("--prompt-step", type=int, default=0)
ap.add_argument("models", nargs="+")
args = ap.parse_args()
info = init_distributed("cpu")
for path in args.models:
    ref = load_model(path)
    model = load_model(path)
    apply_fsdp(model, build_mesh(info), activation_checkpointing="full")
    g = torch.Generator().manual_seed(0)
    rnd = lambda k: torch.randint(3, 96, (k,), generator=g).tolist()  # noqa: E731
    pairs = [TokenizedPair(rnd(4 + args.prompt_step * i), rnd(3) + [2], rnd(5) + [2], index=i) for i in range(4)]
    mine = pairs[2 * info.rank: 2 * info.rank + 2]
    c, r = packed_forward(model, pack(mine, pad_id=0))
    ((c.logps - r.logps).sum() / 2).backward()  # FSDP averages the ranks: the mean of the halves
    c0, r0 = packed_forward(ref, pack(pairs, pad_id=0))
    ((c0.logps - r0.logps).sum() / 4).backward()
    torch.testing.assert_close(c.logps, c0.logps[2 * info.rank: 2 * info.rank + 2], rtol=1e-5, atol=1e-4)
    for (n, p), (_, p0) in zip(model.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad.full_tensor(), p0.grad, rtol=1e-4, atol=1e-5, msg=path + " " + n)
print("OK")
destroy()
