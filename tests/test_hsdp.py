"""HSDP (FSDP2 over a 2-D (replicate, shard) mesh) and the multi-node batch arithmetic (issue 15).

The gloo test launches torchrun with 4 ranks as 2 replicas x 2 shards and compares the final
weights with one process: the global batch, the loss scaling and the loaded shard rows must not
depend on the mesh shape.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.models.checkpoint import hash_weights
from sdpo.runtime import distributed as D
from sdpo.runtime.config import ConfigError, load_config
from sdpo.stepwise import check_setup, train
from runs import torchrun

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=2", "--data.max_examples=16", "--data.max_test_examples=8",
         "--sft.max_steps=3", "--sft.global_batch_size=8", "--sft.micro_batch_size=4",
         "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1",
         "--train.log_every=1", "--eval.summary=false", "--train.device=cpu"]


@pytest.mark.parametrize("world, shard, replicate, local, want", [
    (32, None, None, 8, (4, 8)),     # 4 nodes x 8 GPUs: shard within a node, replicate across
    (8, None, None, 8, (1, 8)),      # one node: plain FSDP
    (4, 2, None, 4, (2, 2)),
    (4, None, 2, 4, (2, 2)),         # dp_replicate alone fixes dp_shard
    (16, 16, None, 8, (1, 16)),      # FSDP over two nodes, if asked for
])
def test_mesh_shape(world, shard, replicate, local, want):
    assert D.mesh_shape(world, shard, replicate, local) == want


@pytest.mark.parametrize("world, shard, replicate", [(32, 3, None), (8, 2, 2), (4, None, 3)])
def test_mesh_shape_that_does_not_tile_the_world_names_the_keys(world, shard, replicate):
    with pytest.raises(ValueError, match=r"train\.dp_replicate .* x train\.dp_shard .* must equal the world size"):
        D.mesh_shape(world, shard, replicate, 8)


def _setup_problems(cfg, world):
    try:
        check_setup(cfg, world)
    except ConfigError as e:
        return str(e)
    return ""


@pytest.mark.parametrize("config", ["solar-10.7b-sdpo.toml", "solar-10.7b-dpo.toml", "mistral-7b-sdpo.toml"])
def test_the_readme_multi_node_command_passes_the_batch_arithmetic(config, monkeypatch):
    """torchrun --nnodes 4 --nproc_per_node 8 with a paper config: 32 ranks, global batch 32 (one pair
    per rank per step; micro_batch_size is a cap), mesh 4 x 8. The paths (weights not here) may
    fail; the batch and mesh checks must not. 24 ranks name the key to change and a value."""
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    cfg = load_config(REPO / "configs" / config, [])
    assert cfg.train.global_batch_size == 32
    msg = _setup_problems(cfg, 32)
    assert "global_batch_size" not in msg and "dp_shard" not in msg, msg
    msg = _setup_problems(cfg, 24)
    assert "train.global_batch_size (32) must be divisible by the world size (24)" in msg
    assert "--train.global_batch_size=48" in msg
    msg = _setup_problems(load_config(REPO / "configs" / config, ["--train.dp_shard=3"]), 32)
    assert "train.dp_shard (3) must equal the world size (32)" in msg


def weights(d):
    return load_file(str(Path(d) / "model.safetensors"))


def test_hsdp_2x2_under_torchrun_equals_one_process(tmp_path, monkeypatch):
    """4 gloo ranks as mesh (replicate 2, shard 2): SFT, both reference passes (M_1 loaded from its
    shard rows with load_sharded), both DPO steps; S, M1, M2 equal the one-process run's."""
    monkeypatch.chdir(REPO)
    proc = torchrun(REPO / "train.py", *SMALL, "--train.dp_shard=2", "--train.timeout_s=600",
                    f"--train.output_dir={tmp_path / 'hsdp'}", nproc=4, timeout=600)
    assert "world size 4" in proc.stderr and "mesh 2 x 2" in proc.stderr, proc.stderr[-3000:]
    train(load_config(REPO / "configs" / "tiny.toml", SMALL + [f"--train.output_dir={tmp_path / 'one'}"]))
    # Float32 sums in another order (4 ranks, two reduction groups), then Adam: an element whose
    # gradient is near 0 moves by up to ~lr·(its relative error), so atol 5e-5 on steps of ~3e-3
    # (lr); training moved the weights by far more than that (checked below).
    for d in ("sft", "M1", "M2"):
        a, b = weights(tmp_path / "one" / d), weights(tmp_path / "hsdp" / d)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-5, msg=lambda m: f"{d}/{k}: {m}")
        # rank 0 wrote the fingerprint once, and it is the hash of what it wrote
        assert json.loads((tmp_path / "hsdp" / d / "sdpo_manifest.json").read_text())["sha256"] == \
            hash_weights(tmp_path / "hsdp" / d)
    moved = max((weights(tmp_path / "one" / "M2")[k] - weights(tmp_path / "one" / "sft")[k]).abs().max()
                for k in a)
    assert moved > 1e-3
