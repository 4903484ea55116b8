"""FSDP2 under torchrun with gloo on CPU: `hidden_states` + `lm_head` called outside
`forward` (as sdpo.logprobs does) must give the unsharded model's values and gradients."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

WORKER = textwrap.dedent(
    r"""
    import sys
    import torch
    import torch.distributed as dist
    from sdpo.distributed import apply_fsdp, build_mesh, full_state_dict, init_distributed, all_reduce
    from sdpo.model import ModelConfig, Transformer

    tied = sys.argv[1] == "tied"
    info = init_distributed("cpu")
    assert info.world_size == 2 and dist.get_backend() == "gloo"
    cfg = ModelConfig(vocab_size=50, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    ref = Transformer(cfg)
    ref.init_weights(seed=3)
    model = Transformer(cfg)
    model.load_state_dict(ref.state_dict())
    apply_fsdp(model, build_mesh(info), reshard_after_forward=True)

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (4, 7), generator=g)            # the global batch
    targets = torch.randint(0, 50, (4, 7), generator=g)

    def loss_of(m, ids, targets):
        # as sdpo.logprobs: hidden states, then lm_head outside forward
        h = m.hidden_states(ids)                                 # [B, T, H]
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

    sd = full_state_dict(model)
    if info.rank == 0:
        for n, t in ref.state_dict().items():
            assert torch.equal(sd[n], t), n
        assert all(t.device.type == "cpu" and not hasattr(t, "placements") for t in sd.values())
        print("OK", sorted(sd)[:2])
    dist.destroy_process_group()
    """
)


@pytest.mark.parametrize("tied", ["untied", "tied"])
def test_fsdp_hidden_states_then_lm_head_matches_unsharded(tmp_path, tied):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
         str(script), tied],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "OK" in proc.stdout


def test_single_process_helpers_are_identities():
    from sdpo.distributed import all_gather_objects, all_reduce, broadcast_object, init_distributed, is_main

    if "WORLD_SIZE" in os.environ:
        pytest.skip("running under torchrun")
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.distributed) == (0, 1, True, False)
    t = torch.tensor([1.5, 2.0])
    assert torch.equal(all_reduce(t.clone()), t)
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert broadcast_object(7) == 7 and is_main()
