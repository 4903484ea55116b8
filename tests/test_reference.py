"""The [reference] section: an external reference (own tokenizer), a live reference, TR-DPO sync.

Tiny models (~20K parameters) built in the test: S on the demo tokenizer (data/tokenizer), and a
reference R on a char-level `tokenizers` BPE with another vocabulary. A few optimizer steps each.
"""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdpo.data.pairs import TokenizedPair, tokenize_pairs
from sdpo.data.read import read_preferences
from sdpo.data.tokenizer import load_tokenizer
from sdpo.models.checkpoint import load_model, save_model
from sdpo.models.model import ModelConfig, Transformer
from sdpo.reference import keep_common, mix_into, pair_logps
from sdpo.runtime.config import ConfigError, load_config
from sdpo.stepwise import train
from runs import torchrun

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.toml"
ORCA = "data/demo/orca_pairs/train.jsonl"
# Two sDPO steps of 16 pairs, 2 optimizer steps each (global batch 8, 2 micro-batches of 4).
ARGS = ["--sft.enabled=false", "--data.max_examples=16", "--data.test_datasets=[]", "--eval.summary=false",
        "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1", "--train.log_every=1",
        "--optim.lr=1e-2", "--optim.warmup_ratio=0", "--train.device=cpu", "--loss.rpo_alpha=none"]
STEP = 2  # optimizer steps per sDPO step with ARGS


def tiny_model(vocab_size: int, seed: int, bos: int, eos: int, pad: int) -> Transformer:
    model = Transformer(ModelConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=128, bos_token_id=bos,
                                    eos_token_id=eos, pad_token_id=pad, torch_dtype="float32"))
    model.init_weights(seed=seed, std=0.2)  # large enough that the models disagree visibly
    return model


def char_tokenizer(path: Path) -> Path:
    """A char-level BPE (no merges) with its own ids: nothing like the demo tokenizer's byte BPE."""
    from tokenizers import Tokenizer, models

    chars = sorted(set("".join(chr(c) for c in range(32, 127)) + "\n"), reverse=True)  # another id order
    specials = ["<unk>", "</s>", "<s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(specials)
    path.mkdir(parents=True)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"}))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """S (demo tokenizer, 308 ids) and R (char tokenizer, 100 ids), HF directories."""
    root = tmp_path_factory.mktemp("models")
    demo = load_tokenizer(REPO / "data" / "tokenizer")
    save_model(tiny_model(demo.vocab_size, 1, demo.bos_id, demo.eos_id, demo.pad_id), root / "S",
               tokenizer_dir=REPO / "data" / "tokenizer")
    chars = load_tokenizer(char_tokenizer(root / "chars"))
    assert chars.vocab_size != demo.vocab_size
    save_model(tiny_model(chars.vocab_size, 2, chars.bos_id, chars.eos_id, chars.pad_id), root / "R",
               tokenizer_dir=root / "chars")
    return root


@pytest.fixture(autouse=True)
def _repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # the configs use repo-relative data paths


def cfg_for(models, out, *extra):
    return load_config(TINY, ARGS + [f"--model.path={models / 'S'}", f"--train.output_dir={out}", *extra])


def dpo_rows(out):
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("stage") == "dpo"]


def assert_same_losses(a, b):
    ra, rb = dpo_rows(a), dpo_rows(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
    for x, y in zip(ra, rb):
        for k in ("loss", "rewards/margins", "logps/chosen"):
            # float32: the cached pass packs pairs into other rows than the training batches (sums
            # in another order, ~1e-7), and Adam's first steps (≈ lr·sign(g)) turn the rounding of
            # near-zero gradients into lr-sized moves: ~1e-5 apart after a step at lr 1e-2
            assert y[k] == pytest.approx(x[k], rel=1e-3, abs=1e-4), (k, x, y)


def test_reference_path_equal_to_the_base_is_plain_dpo(models, tmp_path):
    # model.tokenizer set: the reference's tokenizer (S's copy) is another directory, so the step is
    # tokenized again by it (the same ids) and scored through the external-reference path.
    tok = "--model.tokenizer=data/tokenizer"
    train(cfg_for(models, tmp_path / "dpo", "--data.split=all", tok))
    train(cfg_for(models, tmp_path / "ext", "--data.split=all", tok, f"--reference.path={models / 'S'}"))
    assert_same_losses(tmp_path / "dpo", tmp_path / "ext")
    # Two steps against S: step 2's reference is S, not M_1 (so its first loss is not ln 2).
    train(cfg_for(models, tmp_path / "two", tok, f"--reference.path={models / 'S'}"))
    rows = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reference"] for r in rows if "gamma_ref/mean" in r] == [str(models / "S")] * 2
    second = [r for r in dpo_rows(tmp_path / "two") if r["sdpo_step"] == 2][0]
    assert abs(second["rewards/margins"]) > 1e-3  # policy M_1 vs reference S differ at once


def test_a_reference_with_another_tokenizer_scores_its_own_tokens(models, tmp_path):
    out = tmp_path / "run"
    train(cfg_for(models, out, "--data.split=all", f"--reference.path={models / 'R'}"))
    (cache,) = list((out / "ref_cache").glob("*.safetensors"))
    cached = load_file(cache)
    # R's own scoring of the same texts: its tokenizer, the policy's chat template (the same prompt text).
    policy_tok = load_tokenizer(models / "S")
    ref_tok = load_tokenizer(models / "R", policy_tok.chat_template)
    examples = read_preferences([ORCA])[0][:16]
    ref_pairs, _ = tokenize_pairs(examples, ref_tok, max_length=64, max_prompt_length=48)
    policy_pairs, _ = tokenize_pairs(examples, policy_tok, max_length=64, max_prompt_length=48)
    assert ref_pairs[0].prompt_ids != policy_pairs[0].prompt_ids  # really another tokenization
    assert ref_pairs[0].prompt_ids[0] == ref_tok.bos_id and ref_pairs[0].chosen_ids[-1] == ref_tok.eos_id
    c, r = pair_logps(load_model(models / "R"), ref_pairs, pad_id=ref_tok.pad_id, batch_size=3, packing=False,
                      share_prompt=False)
    torch.testing.assert_close(cached["chosen"], c, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cached["rejected"], r, rtol=1e-5, atol=1e-5)
    assert len(dpo_rows(out)) == STEP


def test_pairs_dropped_by_either_tokenizer_leave_the_step():
    p = lambda i: TokenizedPair([1], [2, i], [3], i)  # noqa: E731
    kept, ref = keep_common([p(0), p(1), p(3)], [p(1), p(2), p(3)])
    assert [x.index for x in kept] == [x.index for x in ref] == [1, 3]


def test_live_reference_equals_cached_and_tr_dpo_hard_sync_at_step_ends_is_sdpo(models, tmp_path):
    train(cfg_for(models, tmp_path / "cached"))
    train(cfg_for(models, tmp_path / "live", "--reference.mode=live"))
    assert_same_losses(tmp_path / "cached", tmp_path / "live")
    assert (tmp_path / "cached" / "ref_cache").is_dir() and not (tmp_path / "live" / "ref_cache").exists()
    # τ = the step length, α = 1: the reference carried into step 2 is the synced M_1, not a reload.
    train(cfg_for(models, tmp_path / "tr", "--reference.mode=live", f"--reference.sync_every={STEP}"))
    assert_same_losses(tmp_path / "cached", tmp_path / "tr")
    # A hard sync after every optimizer step: each step starts with reference == policy, so every
    # loss is ln 2 (DPO at zero margin), where the cached run's second step is not.
    train(cfg_for(models, tmp_path / "tr1", "--reference.mode=live", "--reference.sync_every=1"))
    assert [r["loss"] for r in dpo_rows(tmp_path / "tr1")] == pytest.approx([math.log(2)] * 2 * STEP, abs=1e-6)
    assert abs(dpo_rows(tmp_path / "cached")[1]["loss"] - math.log(2)) > 1e-3


def test_soft_sync_is_the_hand_computed_mix(models):
    ref, policy = load_model(models / "S"), load_model(models / "S")
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p))
    before = {k: v.clone() for k, v in ref.state_dict().items()}
    mix_into(ref, policy, 0.3)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(v, 0.3 * policy.state_dict()[k] + 0.7 * before[k], rtol=1e-6, atol=1e-6)
    with pytest.raises(Exception, match="TR-DPO needs one architecture"):
        mix_into(ref, load_model(models / "R"), 0.5)


@pytest.mark.parametrize("args, message", [
    (["--reference.sync_every=2"], 'needs reference.mode = "live"'),
    (["--reference.mode=online"], "reference.mode must be one of"),
    (["--reference.mode=live", "--reference.sync_every=2", "--reference.sync_alpha=0"], "sync_alpha must be in (0, 1]"),
    (["--reference.tokenizer=data/tokenizer"], "reference.tokenizer needs reference.path"),
])
def test_bad_reference_options_fail_naming_the_key(args, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        load_config(TINY, args)


def test_live_reference_with_another_tokenizer_is_refused(models, tmp_path):
    with pytest.raises(ConfigError, match="use reference.mode = \"cached\""):
        train(cfg_for(models, tmp_path / "x", "--data.split=all", "--reference.mode=live",
                      f"--reference.path={models / 'R'}"))


TWO_RANKS = r'''
import json, sys, torch
from sdpo.reference import mix_into
from sdpo.runtime import distributed as D
from sdpo.runtime.config import load_config
from sdpo.stepwise import train
models, out, args = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
for name, extra in json.loads(sys.argv[4]).items():
    train(load_config("configs/tiny.toml", args + [f"--train.output_dir={out}/{name}", *extra]))
# The soft sync on FSDP2 shards: each rank mixes its own rows; gathered, it is the hand mix.
info = D.init_distributed("cpu")
mesh = D.build_mesh(info)
ref, policy = (D.load_sharded(d, mesh, device=info.device) for d in (f"{models}/S", f"{models}/R2"))
mix_into(ref, policy, 0.25)
full = D.full_state_dict(ref)
if info.is_main:
    torch.save(full, f"{out}/mixed.pt")
D.destroy()
'''


def test_torchrun_two_ranks_equal_one_process(models, tmp_path):
    save_model(tiny_model(load_tokenizer(models / "S").vocab_size, 3, 1, 2, 0), models / "R2")  # S's shapes
    runs = {"ext": ["--data.split=all", f"--reference.path={models / 'R'}"],
            "tr": ["--reference.mode=live", f"--reference.sync_every={STEP}"],
            "soft": ["--reference.mode=live", "--reference.sync_every=1", "--reference.sync_alpha=0.5"]}
    args = ARGS + [f"--model.path={models / 'S'}"]
    script = tmp_path / "two_ranks.py"
    script.write_text(TWO_RANKS)
    torchrun(script, models, tmp_path / "two", json.dumps(args), json.dumps(runs), timeout=400)
    for name, extra in runs.items():
        train(load_config(TINY, args + [f"--train.output_dir={tmp_path / 'one' / name}", *extra]))
        ra, rb = dpo_rows(tmp_path / "one" / name), dpo_rows(tmp_path / "two" / name)
        assert [r["step"] for r in ra] == [r["step"] for r in rb] and ra
        for x, y in zip(ra, rb):
            assert y["loss"] == pytest.approx(x["loss"], rel=1e-4, abs=1e-5), (name, x, y)
    mixed = torch.load(tmp_path / "two" / "mixed.pt")
    s, r2 = load_model(models / "S").state_dict(), load_model(models / "R2").state_dict()
    for k, v in s.items():
        torch.testing.assert_close(mixed[k], 0.25 * r2[k] + 0.75 * v, rtol=1e-6, atol=1e-6)
