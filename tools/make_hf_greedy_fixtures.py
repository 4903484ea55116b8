"""Greedy tokens from Hugging Face transformers' generate() for the tiny fixture models.

Needs transformers (sdpo never imports it); run it in a separate environment:
    python -m venv --system-site-packages /tmp/hfenv && /tmp/hfenv/bin/pip install transformers
    /tmp/hfenv/bin/python tools/make_hf_greedy_fixtures.py   # writes tests/fixtures/hf_reference/greedy.json

For each model made by tools/make_hf_fixtures.py: the prompts one at a time, and the same prompts as
one left-padded batch (transformers derives positions from the attention mask in generate(), as sdpo
does), EOS disabled so every row runs max_new_tokens. tests/test_generate.py compares sdpo.models.generate.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures" / "hf_reference"
NAMES = ["llama", "llama3", "mistral", "qwen2", "llama_linear", "llama_dynamic",
         "qwen3", "gemma2", "gemma3_text", "olmo2", "olmo3", "phi3", "smollm3", "ministral3"]
MAX_NEW = 12


def prompts_for(vocab: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(7)
    return [[1] + torch.randint(3, vocab, (n,), generator=g).tolist() for n in (7, 2, 4)]


def main(only: list[str] | None = None) -> None:
    import transformers
    from transformers import AutoModelForCausalLM

    path = FIXTURES / "greedy.json"
    out = {"transformers": transformers.__version__, "max_new_tokens": MAX_NEW, "models": {}}
    if only and path.is_file():  # keep the other models' entries as they are
        out = json.loads(path.read_text())
        out.setdefault("versions", {})
    for name in only or NAMES:
        model = AutoModelForCausalLM.from_pretrained(FIXTURES / name, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # run every row to MAX_NEW
        model.generation_config.pad_token_id = 0
        prompts = prompts_for(model.config.vocab_size)
        kw = dict(max_new_tokens=MAX_NEW, do_sample=False, num_beams=1)
        with torch.no_grad():
            alone = [model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                    **kw)[0, len(p):].tolist() for p in prompts]
            T = max(len(p) for p in prompts)
            ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
            mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
            batched = model.generate(ids, attention_mask=mask, **kw)[:, T:].tolist()
        out["models"][name] = {"prompts": prompts, "alone": alone, "batched": batched}
        if "versions" in out:
            out["versions"][name] = transformers.__version__
        print(f"{name}: alone == batched: {alone == batched}")
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    import sys

    main(sys.argv[1:] or None)  # model names: regenerate only these entries
