"""Reward models: the decoder plus a `score` head, as transformers writes `...ForSequenceClassification`.

An HF sequence-classification checkpoint of a supported family (LlamaForSequenceClassification,
MistralForSequenceClassification, ...; the config.json is read as for the causal LM) holds the
decoder's tensors under "model." and a bias-free `score.weight` [num_labels, H], and no lm_head. Its reward is the
head applied to the final hidden state (after the last norm) of the last non-pad token:

    r(x, y) = score.weight @ h_T        T = the last token of prompt + response, [num_labels]

A reward model has one label; r is that number. Sequences here are right-padded and read at
their own last position, which is transformers' "last non-pad token" whenever the text itself
holds no pad token.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from torch import nn

from sdpo.models.checkpoint import _weight_files, expected_shapes, from_hf_name, open_safetensors
from sdpo.models.hf_config import CheckpointError, dtype_name, load_model_config, parse_dtype
from sdpo.models.model import Transformer

HEAD = "score.weight"


class RewardModel(nn.Module):
    def __init__(self, decoder: Transformer, score: nn.Linear):
        super().__init__()
        self.decoder, self.score = decoder, score
        self.config = decoder.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask [B, T], right-padded -> rewards [B] (float32)."""
        hidden = self.decoder.hidden_states(input_ids, attention_mask)  # [B, T, H]
        last = attention_mask.sum(dim=1) - 1                               # [B]
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]  # [B, H]
        return self.score(pooled).float()[:, 0]


def load_reward_model(path, dtype=None, device=None) -> RewardModel:
    """The decoder and its score head from an HF ...ForSequenceClassification directory; a
    causal-LM directory, or one whose head is missing, is refused with the file named."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: not a directory")
    # No lm_head in these checkpoints: the decoder is built with tied embeddings, so it needs none
    # (its lm_head is never called).
    config = dataclasses.replace(load_model_config(root), tie_word_embeddings=True)
    dtype = parse_dtype(dtype if dtype is not None else config.torch_dtype, f"load_reward_model({root})")
    device = torch.device(device if device is not None else "cpu")
    expected = expected_shapes(config)
    files = _weight_files(root)
    tensors, head, lm_head = {}, None, False
    for file in files:
        with open_safetensors(file) as f:
            for key in f.keys():
                ours = from_hf_name(key)
                if key == HEAD:
                    head = f.get_tensor(key)
                elif ours in expected:
                    tensors[ours] = f.get_tensor(key)
                elif key == "lm_head.weight":
                    lm_head = True
                elif not key.endswith("rotary_emb.inv_freq"):
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} for a {config.model_type} "
                                          f"sequence-classification model")
    if head is None:
        what = "a causal LM (it has lm_head.weight)" if lm_head else "no score head"
        raise CheckpointError(f"{root}: no {HEAD!r} tensor: {what}; a reward model is an HF "
                              f"...ForSequenceClassification checkpoint with a score head [1, hidden_size]")
    if head.dim() != 2 or head.shape[1] != config.hidden_size or head.shape[0] != 1:
        raise CheckpointError(f"{root}: {HEAD} has shape {list(head.shape)}; a reward model's is "
                              f"[1, {config.hidden_size}] (one label)")
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{root}: tensors missing for the decoder: {missing[:5]}")
    for name, t in tensors.items():
        if tuple(t.shape) != expected[name]:
            raise CheckpointError(f"{root}: tensor {name!r} has shape {list(t.shape)}, expected {list(expected[name])}")
    with torch.device("meta"):
        decoder = Transformer(config)
        score = nn.Linear(config.hidden_size, 1, bias=False)
    decoder.load_state_dict({k: v.to(device, dtype) for k, v in tensors.items()}, strict=False, assign=True)
    decoder.tie_weights()
    score.load_state_dict({"weight": head.to(device, dtype)}, assign=True)
    decoder.config.torch_dtype = dtype_name(dtype)
    return RewardModel(decoder, score).eval()


@torch.no_grad()
def reward_scores(model: RewardModel, seqs: list[list[int]], *, pad_id: int, batch_size: int) -> list[float]:
    """One reward per token sequence, in batches of batch_size right-padded rows."""
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(seqs), batch_size):
        chunk = seqs[i: i + batch_size]
        T = max(len(s) for s in chunk)
        ids = torch.full((len(chunk), T), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), T), dtype=torch.long)
        for j, s in enumerate(chunk):
            ids[j, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[j, : len(s)] = 1
        out += model(ids.to(device), mask.to(device)).tolist()
    return out
