"""FSDP2 under torchrun with gloo on CPU: `hidden_states` + `lm_head` called outside
`forward` (as sdpo.logprobs does), or the fused kernels.linear_token_logprobs on the root's
unsharded lm_head weight with every-2nd-block checkpointing, must give the unsharded model's
values and gradients; reshard_root frees the root after a no-grad pass."""

import json
import os
import textwrap
from pathlib import Path

import pytest
import torch

from runs import torchrun

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    r"""
    import sys
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    import kernels
    from sdpo.models.model import ModelConfig, Transformer
    from sdpo.runtime.distributed import apply_fsdp, build_mesh, destroy, full_state_dict, init_distributed, all_reduce, reshard_root

    info = init_distributed("cpu")
    assert info.world_size == 2 and dist.get_backend() == "gloo"


    def check(tied, fused):
        cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        ref = Transformer(cfg)
        ref.init_weights(seed=3)
        model = Transformer(cfg)
        model.load_state_dict(ref.state_dict())
        apply_fsdp(model, build_mesh(info), reshard_after_forward=True,
                   activation_checkpointing="every:2" if fused else "none")

        g = torch.Generator().manual_seed(0)
        ids = torch.randint(0, 50, (4, 7), generator=g)            # the global batch
        targets = torch.randint(0, 50, (4, 7), generator=g)

        def loss_of(m, ids, targets):
            # as sdpo.logprobs: hidden states, then lm_head outside forward
            h = m.hidden_states(ids)                                 # [B, T, H]
            if fused:                                                # the root's unsharded weight
                return -kernels.linear_token_logprobs(h.reshape(-1, h.shape[-1]), m.lm_head.weight,
                                                      targets.reshape(-1), chunk_size=5).mean()
            logp = torch.log_softmax(m.lm_head(h).float(), -1)       # [B, T, V]
            return -logp.gather(-1, targets[..., None]).mean()

        # two iterations, so a resharded root would be caught on the second call
        for it in range(2):
            mine = slice(2 * info.rank, 2 * info.rank + 2)            # this rank's half
            loss = loss_of(model, ids[mine], targets[mine])
            loss.backward()
            ref.zero_grad()
            loss_of(ref, ids, targets).backward()                   # mean over the whole batch
            full = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
            for n, p in ref.named_parameters():
                torch.testing.assert_close(full[n], p.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
            total = all_reduce(loss.detach().clone()) / 2
            torch.testing.assert_close(total, loss_of(ref, ids, targets).detach())
            model.zero_grad()

        # The reference pass: no backward, so the root stays gathered until reshard_root.
        with torch.no_grad():
            model.hidden_states(ids[:1])
        assert not isinstance(model.lm_head.weight, DTensor)
        reshard_root(model)
        assert isinstance(model.lm_head.weight, DTensor) and isinstance(model.embed_tokens.weight, DTensor)

        sd = full_state_dict(model)
        if info.rank == 0:
            for n, t in ref.state_dict().items():
                assert torch.equal(sd[n], t), n
            assert all(t.device.type == "cpu" and not hasattr(t, "placements") for t in sd.values())
            print("OK", "tied" if tied else "untied", "fused" if fused else "unfused", flush=True)


    for tied in (False, True):   # the four cases in one torchrun: one start-up and one process group
        for fused in (False, True):
            check(tied, fused)
    destroy()
    """
)


@pytest.fixture(scope="module")
def fsdp_cases(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("fsdp")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    return torchrun(script, cwd=tmp_path, timeout=600, check=False)


@pytest.mark.parametrize("tied, fused", [("untied", "unfused"), ("tied", "unfused"), ("untied", "fused"),
                                         ("tied", "fused")])
def test_fsdp_hidden_states_then_lm_head_matches_unsharded(fsdp_cases, tied, fused):
    proc = fsdp_cases
    assert f"OK {tied} {fused}" in proc.stdout, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]


def test_single_process_helpers_are_identities():
    from sdpo.runtime.distributed import all_gather_objects, all_reduce, broadcast_object, init_distributed, is_main

    if "WORLD_SIZE" in os.environ:
        pytest.skip("running under torchrun")
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    t = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce(t.clone()), t)
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert broadcast_object(7) == 7 and is_main()


# ------------------------------------------------------------------------------------------
# load_sharded: each rank reads only its FSDP2 shard rows from the safetensors files

LOAD_WORKER = textwrap.dedent(
    r"""
    import gc, json, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import Shard, distribute_tensor
    from sdpo.models.checkpoint import load_model
    from sdpo.runtime.distributed import build_mesh, destroy, full_state_dict, init_distributed, load_sharded

    def rss():  # current resident set, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    def maxrss():  # this process's peak resident set so far, bytes (VmHWM: unlike ru_maxrss, not the parent's)
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    small, big, result_dir = sys.argv[1:4]
    info = init_distributed("cpu")
    mesh = build_mesh(info)
    out = {}
    # Warm up imports and FSDP/DTensor/safetensors lazy init, so the measurement sees the weights only.
    load_sharded(f"{small}/untied", mesh)
    gc.collect()
    dist.barrier()

    # Memory first (the process's peak must not have been raised by anything larger before).
    before = rss()
    model = load_sharded(big, mesh)
    out["sharded_added"] = maxrss() - before
    out["sharded_resident"] = rss() - before
    del model
    gc.collect()
    before = rss()
    ref = load_model(big, dtype=torch.float32, device="cpu")  # the old path: a full float32 copy
    out["full_added"] = maxrss() - before
    del ref
    gc.collect()

    for name in ("untied", "tied"):
        path = f"{small}/{name}"
        model = load_sharded(path, mesh)
        ref = load_model(path, dtype=torch.float32, device="cpu")
        assert (model.lm_head.weight is model.embed_tokens.weight) == (name == "tied"), name
        for n, p in model.named_parameters():
            # FSDP2's own split of the full tensor, compared with what we read for this rank
            want = distribute_tensor(ref.get_parameter(n).detach(), mesh, [Shard(0)]).to_local()
            assert p.to_local().shape == want.shape and torch.equal(p.to_local(), want), (name, n)
        sd = full_state_dict(model)
        if info.rank == 0:
            assert sd.keys() == ref.state_dict().keys()
            for n, t in ref.state_dict().items():
                assert sd[n].dtype == torch.float32 and torch.equal(sd[n], t), (name, n)
        # a forward all-gathers from FSDP's padded shard buffers, not from the DTensor views
        ids = torch.randint(0, ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(model(ids), ref(ids), rtol=1e-6, atol=1e-6)
        out[name] = [tuple(p.to_local().shape) for n, p in model.named_parameters() if n == "embed_tokens.weight"]
    with open(f"{result_dir}/rank{info.rank}.json", "w") as f:
        json.dump(out, f)
    destroy()
    """
)


def test_shard_rows_follow_torch_chunk():
    from sdpo.runtime.distributed import shard_rows

    for n in (1, 2, 5, 7, 8, 51):
        for world in (1, 2, 3, 4, 8):
            chunks = list(torch.arange(n).chunk(world))
            chunks += [torch.arange(0)] * (world - len(chunks))  # torch.chunk may return fewer chunks
            for rank, c in enumerate(chunks):
                start, stop = shard_rows(n, world, rank)
                assert list(range(start, stop)) == c.tolist(), (n, world, rank)


def test_load_sharded_equals_load_model_and_holds_one_shard(tmp_path):
    from sdpo.models.checkpoint import save_model
    from sdpo.models.model import ModelConfig, Transformer

    # vocab 51 -> 26 + 25 rows over 2 ranks (uneven chunks); bf16 on disk (the cast is part of
    # the load); the untied one in several safetensors files behind an index.
    for tied in (False, True):
        cfg = ModelConfig(vocab_size=51, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
        m = Transformer(cfg)
        m.init_weights(seed=5 + tied)
        save_model(m, tmp_path / "small" / ("tied" if tied else "untied"), dtype="bfloat16",
                   max_shard_size="5GB" if tied else "4KB")
    assert (tmp_path / "small" / "untied" / "model.safetensors.index.json").is_file()
    # ~127 MB in float32 (31.7M parameters), stored bf16; odd vocab again.
    big_cfg = ModelConfig(vocab_size=32001, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
                          num_attention_heads=6)
    with torch.device("meta"):
        numel = sum(p.numel() for p in Transformer(big_cfg).parameters())
    big = Transformer(big_cfg)
    big.init_weights(seed=0, std=0.02)
    save_model(big, tmp_path / "big", dtype="bfloat16", max_shard_size="40MB")
    del big
    fp32_bytes = 4 * numel

    script = tmp_path / "load_worker.py"
    script.write_text(LOAD_WORKER)
    torchrun(script, tmp_path / "small", tmp_path / "big", tmp_path, cwd=tmp_path)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["untied"][0][0] for r in results) == [25, 26]
    for r in results:
        mb = {k: round(v / 1e6, 1) for k, v in r.items() if k.endswith(("added", "resident"))}
        print(f"model {fp32_bytes / 1e6:.0f} MB fp32; per rank: {mb}")
        # One rank keeps half the float32 model, plus at most one tensor's rows in flight at the peak.
        assert r["sharded_resident"] < 0.6 * fp32_bytes, (r, fp32_bytes)
        assert r["sharded_added"] < 0.75 * fp32_bytes, (r, fp32_bytes)
        # the same measurement does see a full copy when one is made (allocator reuse blurs it a little)
        assert r["full_added"] > 0.85 * fp32_bytes, (r, fp32_bytes)


# ------------------------------------------------------------------------------------------
# The reference cache: a fingerprint written once next to M_t, a foreign model hashed once,
# hit or miss decided by rank 0 alone

def _tiny_dir(path, seed=0):
    from sdpo.models.model import ModelConfig, Transformer

    m = Transformer(ModelConfig(vocab_size=40, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                num_attention_heads=2))
    m.init_weights(seed=seed)
    return m


def test_export_manifest_holds_the_files_hash_and_is_read_instead_of_hashing(tmp_path, monkeypatch):
    from sdpo import reference
    from sdpo.models import checkpoint
    from sdpo.models.checkpoint import MANIFEST_NAME, hash_weights, read_manifest, save_state_dict

    m = _tiny_dir(tmp_path)
    save_state_dict(m.state_dict(), m.config, tmp_path / "M1", manifest=True, max_shard_size="2KB")
    assert len(list((tmp_path / "M1").glob("*.safetensors"))) > 1  # sharded: every file is covered
    fingerprint = json.loads((tmp_path / "M1" / MANIFEST_NAME).read_text())["sha256"]
    assert fingerprint == hash_weights(tmp_path / "M1")  # the same key as hashing the directory
    calls = []
    monkeypatch.setattr(reference, "hash_weights", lambda d: calls.append(d) or "hashed")
    assert reference.weights_fingerprint(tmp_path / "M1", tmp_path / "cache") == fingerprint and not calls
    # Rewritten weights (other content, other mtime) make the manifest stale: hashed again.
    f = sorted((tmp_path / "M1").glob("*.safetensors"))[0]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    later = (tmp_path / "M1" / MANIFEST_NAME).stat().st_mtime_ns + 10**9  # coarse-mtime filesystems
    os.utime(f, ns=(later, later))
    assert read_manifest(tmp_path / "M1") is None
    assert reference.weights_fingerprint(tmp_path / "M1", tmp_path / "cache") == "hashed" and len(calls) == 1
    # A damaged manifest is no manifest.
    (tmp_path / "M1" / MANIFEST_NAME).write_text("{not json")
    assert checkpoint.read_manifest(tmp_path / "M1") is None


def test_foreign_model_is_hashed_once_and_again_when_its_files_change(tmp_path, monkeypatch):
    from sdpo import reference
    from sdpo.models.checkpoint import MANIFEST_NAME, save_state_dict

    m = _tiny_dir(tmp_path)
    save_state_dict(m.state_dict(), m.config, tmp_path / "base")  # no manifest: a foreign directory
    assert not (tmp_path / "base" / MANIFEST_NAME).exists()
    real, calls = reference.hash_weights, []
    monkeypatch.setattr(reference, "hash_weights", lambda d: calls.append(d) or real(d))
    first = reference.weights_fingerprint(tmp_path / "base", tmp_path / "cache")
    assert reference.weights_fingerprint(tmp_path / "base", tmp_path / "cache") == first and len(calls) == 1
    table = json.loads((tmp_path / "cache" / reference.FINGERPRINTS).read_text())
    assert table[str((tmp_path / "base").resolve())]["sha256"] == first
    save_state_dict(_tiny_dir(tmp_path, seed=1).state_dict(), m.config, tmp_path / "base")  # new weights
    second = reference.weights_fingerprint(tmp_path / "base", tmp_path / "cache")
    assert len(calls) == 2 and second != first
    (tmp_path / "cache" / reference.FINGERPRINTS).write_text("[damaged")  # only a cache: hash again
    assert reference.weights_fingerprint(tmp_path / "base", tmp_path / "cache") == second and len(calls) == 3


def test_cache_hit_or_miss_is_rank_zeros_decision(tmp_path, monkeypatch):
    """A rank other than 0 never hashes or looks at the cache: it takes rank 0's broadcast answer,
    a hit (whatever its own disk holds) or a miss (then it joins the pass, as rank 0 does)."""
    from types import SimpleNamespace

    from sdpo import reference
    from sdpo.runtime.config import load_config

    cfg = load_config(REPO / "configs" / "tiny.toml", [f"--train.output_dir={tmp_path / 'run'}"])
    info = SimpleNamespace(rank=1, world_size=2, is_main=False, distributed=True, device=torch.device("cpu"))
    run = SimpleNamespace(cfg=cfg, info=info, out=tmp_path / "run", autocast_dtype=None, tokenizer=None)
    forbidden = lambda *a, **k: pytest.fail("rank 1 looked at the cache or hashed weights")  # noqa: E731
    monkeypatch.setattr(reference, "weights_fingerprint", forbidden)
    monkeypatch.setattr(reference, "load_file", forbidden)
    hit = (torch.tensor([-1.0, -2.0]), torch.tensor([-3.0, -4.0]))
    monkeypatch.setattr(reference.D, "broadcast_object", lambda obj, src=0: ("k" * 24, hit))
    assert reference.reference_logps(run, tmp_path / "nowhere", [object(), object()], "t") is hit

    passes = []
    monkeypatch.setattr(reference.D, "broadcast_object", lambda obj, src=0: ("k" * 24, None))
    monkeypatch.setattr(reference, "load_for_training", lambda run, d, **k: passes.append(d) or object())
    monkeypatch.setattr(reference, "run_pair_logps", lambda run, m, pairs, bs, **k: hit)
    monkeypatch.setattr(reference.D, "barrier", lambda *a, **k: None)
    chosen, rejected = reference.reference_logps(run, tmp_path / "nowhere", [object(), object()], "t")
    assert chosen is hit[0] and rejected is hit[1]
    assert passes == [tmp_path / "nowhere"]
    assert not (tmp_path / "run" / "ref_cache").exists()  # rank 0 writes the cache, not rank 1


# ------------------------------------------------------------------------------------------
# train.compile: torch.compile of the blocks, applied from outside

def _inductor_or_skip():
    import shutil

    if shutil.which(os.environ.get("CC", "cc")) is None and shutil.which("gcc") is None:
        pytest.skip("torch.compile (inductor) needs a C compiler on CPU; none found")
    try:
        torch.compile(lambda x: x.sin() + 1)(torch.ones(3))
    except Exception as e:  # no working toolchain, an unsupported platform
        pytest.skip(f"torch.compile (inductor) does not work here: {type(e).__name__}: {str(e)[:200]}")


@pytest.mark.slow
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_compiled_blocks_give_the_eager_loss_and_gradients(packed):
    from sdpo.data.packing import collate, pack
    from sdpo.data.pairs import TokenizedPair
    from sdpo.logprobs import pair_forward
    from sdpo.models.model import ModelConfig, Transformer
    from sdpo.runtime.distributed import compile_blocks

    _inductor_or_skip()
    cfg = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    eager = Transformer(cfg)
    eager.init_weights(seed=4)
    compiled = Transformer(cfg)
    compiled.load_state_dict(eager.state_dict())
    names = [n for n, _ in compiled.named_parameters()]
    compile_blocks(compiled)
    assert [n for n, _ in compiled.named_parameters()] == names  # exports and DCP state keep their keys
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(1, 64, (n,), generator=g).tolist()  # noqa: E731
    pairs = [TokenizedPair(ids(5), ids(4), ids(6), 0), TokenizedPair(ids(3), ids(7), ids(2), 1)]
    batch = pack(pairs, pad_id=0, rows="longest") if packed else collate(pairs, pad_id=0)

    def loss_of(model):
        c, r = pair_forward(model, batch)
        loss = -torch.nn.functional.logsigmoid(0.1 * (c.logps - r.logps)).sum()
        loss.backward()
        return loss.detach()

    torch.testing.assert_close(loss_of(compiled), loss_of(eager), rtol=1e-5, atol=1e-6)
    grads = dict(eager.named_parameters())
    for n, p in compiled.named_parameters():
        torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-6, msg=lambda m: f"{n}: {m}")
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in compiled.layers)  # really compiled
    assert not hasattr(eager.layers[0].forward, "_torchdynamo_orig_callable")


# ------------------------------------------------------------------------------------------
# Gradient reduction deferred to the last micro-batch of a step (issue 29, finding 5)

DEFER_WORKER = textwrap.dedent(
    r"""
    import sys
    import torch
    import torch.distributed as dist
    from sdpo.models.model import ModelConfig, Transformer
    from sdpo.runtime.distributed import (apply_fsdp, build_mesh, defer_gradient_reduction, destroy,
                                          init_distributed, _is_hsdp)

    info = init_distributed("cpu")
    assert info.world_size == 4 and dist.get_backend() == "gloo"
    cfg = ModelConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2)
    ref = Transformer(cfg)
    ref.init_weights(seed=5)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 40, (16, 6), generator=g)           # the global batch: 4 ranks x 2 micro-batches x 2
    targets = torch.randint(0, 40, (16, 6), generator=g)

    def loss_of(m, ids, targets):
        logp = torch.log_softmax(m(ids).float(), -1)
        return -logp.gather(-1, targets[..., None]).sum() / (16 * 6)

    loss_of(ref, ids, targets).backward()
    want = {n: p.grad for n, p in ref.named_parameters()}

    def grads(mesh_shape, defer, reduce_scatter):
        model = Transformer(cfg)
        model.load_state_dict(ref.state_dict())
        mesh = build_mesh(info, *mesh_shape)
        apply_fsdp(model, mesh)
        assert _is_hsdp(model) == (mesh.ndim == 2)
        mine = ids[4 * info.rank: 4 * info.rank + 4], targets[4 * info.rank: 4 * info.rank + 4]
        for step in range(2):                                    # twice: the flags must be reset per step
            model.zero_grad()
            for k in range(2):                                   # two micro-batches per step
                if defer:
                    defer_gradient_reduction(model, k < 1, reduce_scatter=reduce_scatter)
                # x 4: FSDP averages over the 4 ranks
                (4 * loss_of(model, mine[0][2 * k: 2 * k + 2], mine[1][2 * k: 2 * k + 2])).backward()
        return {n: p.grad.full_tensor() for n, p in model.named_parameters()}

    for mesh_shape, reduce_scatter in (((2, 2), False), ((2, 2), True), ((4, 1), True)):
        base = grads(mesh_shape, False, False)
        deferred = grads(mesh_shape, True, reduce_scatter)
        for n, w in want.items():
            torch.testing.assert_close(base[n], w, rtol=1e-5, atol=1e-6, msg=lambda m: f"{n}: {m}")
            torch.testing.assert_close(deferred[n], base[n], rtol=1e-6, atol=1e-7, msg=lambda m: f"{n}: {m}")
    if info.rank == 0:
        print("OK")
    destroy()
    """
)


@pytest.mark.slow   # ~60 s on 2 cores (4 ranks, three meshes)
def test_deferred_gradient_reduction_gives_the_same_gradients(tmp_path):
    """HSDP 2 x 2 skipping the replica all-reduce, and FSDP (1-D and 2-D) also skipping the
    reduce-scatter, on all but the last of two micro-batches: the gradients of two steps equal the
    every-micro-batch reduction and the one-process gradient (gloo, 4 ranks)."""
    script = tmp_path / "worker.py"
    script.write_text(DEFER_WORKER)
    proc = torchrun(script, nproc=4, cwd=tmp_path, env={"LOCAL_WORLD_SIZE": "4"})
    assert "OK" in proc.stdout
