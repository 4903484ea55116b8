"""A reward-model fixture from Hugging Face transformers (sdpo never imports it):

    /opt/hf/bin/python tools/make_score_fixture.py     # writes tests/fixtures/hf_reference/llama_score/

A tiny random LlamaForSequenceClassification (num_labels 1, the demo tokenizer's vocab and chat
template, copied in), saved with save_pretrained, plus expected.json: for a few (prompt, completion)
conversations, the token ids transformers' tokenizer makes with the chat template and the reward
transformers computes for them, batched and right-padded (its last non-pad token). tests/test_online.py
checks sdpo.models.score and the reward_model judge against these numbers.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "hf_reference" / "llama_score"
sys.path.insert(0, str(ROOT / "tools"))
from make_hf_fixtures import randomize  # noqa: E402

CONVERSATIONS = [("copy: abc", "abc"), ("copy: abc", "abd"), ("add: 7+5", "12"), ("add: 7+5", "2"),
                 ("reverse: hello", "olleh")]


def main() -> None:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tok_dir = ROOT / "data" / "tokenizer"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-5,
                         num_labels=1, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config).eval()
    randomize(model, seed=300)
    ids = [tok.apply_chat_template([{"role": "user", "content": p}, {"role": "assistant", "content": c}],
                                   tokenize=True, add_generation_prompt=False) for p, c in CONVERSATIONS]
    ids = [list(x["input_ids"]) if isinstance(x, dict) or hasattr(x, "keys") else list(x) for x in ids]
    batch = tok.pad({"input_ids": ids}, padding=True, padding_side="right", return_tensors="pt")
    with torch.no_grad():
        rewards = model(**batch).logits[:, 0].tolist()
    if OUT.exists():
        shutil.rmtree(OUT)
    model.save_pretrained(OUT)
    tok.save_pretrained(OUT)
    expected = {"transformers": __import__("transformers").__version__, "conversations": CONVERSATIONS,
                "input_ids": ids, "rewards": rewards}
    (OUT / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {OUT}: rewards {rewards}")


if __name__ == "__main__":
    main()
