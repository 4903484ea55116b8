import json
import os
from pathlib import Path

import pytest

# Triton kernels run under the interpreter on CPU tensors when no GPU is present.
# The variable must be set before triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def user_model(tmp_path):
    """(model directory, pairs file): a tiny random HF-format model saved with the demo tokenizer's files,
    and 16 arithmetic preference pairs as JSONL, as a user would bring them."""
    from sdpo.models.checkpoint import save_model
    from sdpo.models.model import ModelConfig, Transformer

    model = Transformer(ModelConfig(vocab_size=400, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, max_position_embeddings=256, bos_token_id=1,
                                    eos_token_id=2, pad_token_id=0))
    model.init_weights(seed=0)
    save_model(model, tmp_path / "model", tokenizer_dir=Path(__file__).resolve().parents[1] / "data" / "tokenizer")
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Question {i}: what is {i} + 1?\n", "chosen": f"{i + 1}",
                                        "rejected": f"{i + 2}"}) + "\n" for i in range(16)))
    return tmp_path / "model", data
