"""No host sync inside a micro-batch step, in any module (issue 15, item 3).

On a GPU, .item() / bool() / int() / float() / .tolist() / nonzero() / .cpu() / .numpy() of a
device tensor blocks the host until the GPU catches up, every micro-batch. CPU tensors cannot
tell a real sync from a free read, so patched Tensor methods record the calls themselves, from
a batch's to_device until its backward returns (training) or the next batch is built / the
model leaves eval mode (the no-grad reference pass): the model, sdpo.logprobs, the attention
masks, the kernels, the loss and the loop all run inside that window.
"""

import sys
from pathlib import Path

import pytest
import torch

from sdpo import loop, reference
from sdpo.data import packing
from sdpo.runtime.config import load_config
from sdpo.stepwise import train

REPO = Path(__file__).resolve().parents[1]

# Tensor methods that wait for the device. Patched on the class rather than seen through a
# TorchFunctionMode: a mode is switched off while it handles a call, so it would not see what
# runs inside backward() (the kernels' autograd Functions); a patch sees every call.
SYNC_METHODS = ("item", "__bool__", "__int__", "__float__", "__index__", "tolist", "nonzero", "cpu", "numpy")

SMALL = ["--model.hidden_size=32", "--model.intermediate_size=64", "--model.num_hidden_layers=2",
         "--model.num_attention_heads=2", "--data.max_examples=16", "--data.max_test_examples=8",
         "--sft.max_steps=2", "--sft.global_batch_size=8", "--sft.micro_batch_size=4",
         "--train.global_batch_size=8", "--train.micro_batch_size=4", "--train.epochs=1",
         "--train.log_every=1", "--eval.summary=false"]


def where(frame) -> str:
    """The first frame outside torch itself: the line of ours (or a kernel's) that asked."""
    while frame is not None and "/torch/" in frame.f_code.co_filename:
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} ({frame.f_code.co_name})"


@pytest.fixture
def watch_steps(monkeypatch):
    """Opens the window at to_device, closes it after backward / at the next batch / model.train();
    yields (the calls recorded inside it, one entry per window opened)."""
    seen, opened, state = [], [], {"open": False}

    def recorder(name, real):
        def spy(self, *a, **k):
            if state["open"]:
                seen.append(f"{name} at {where(sys._getframe(1))}")
            return real(self, *a, **k)
        return spy

    for name in SYNC_METHODS:
        monkeypatch.setattr(torch.Tensor, name, recorder(name, getattr(torch.Tensor, name)))
    monkeypatch.setattr(torch, "nonzero", recorder("nonzero", torch.nonzero))
    real_getitem = torch.Tensor.__getitem__

    def getitem(self, idx):  # x[bool mask] runs nonzero() in C++: a sync no Python call shows
        if state["open"] and any(isinstance(i, torch.Tensor) and i.dtype == torch.bool
                                 for i in (idx if isinstance(idx, tuple) else (idx,))):
            seen.append(f"boolean-mask indexing at {where(sys._getframe(1))}")
        return real_getitem(self, idx)

    monkeypatch.setattr(torch.Tensor, "__getitem__", getitem)

    def open_window():
        if not state["open"]:
            state["open"] = True
            opened.append(1)

    def close_window():
        state["open"] = False

    def wrap(module, name, before=None, after=None):
        real = getattr(module, name)

        def spy(*a, **k):
            before and before()
            out = real(*a, **k)
            after and after()
            return out

        monkeypatch.setattr(module, name, spy)

    for module in (loop, reference):
        wrap(module, "collate", before=close_window)
        wrap(module, "pack", before=close_window)
        wrap(module, "to_device", after=open_window)
    wrap(torch.Tensor, "backward", after=close_window)
    real_train = torch.nn.Module.train
    monkeypatch.setattr(torch.nn.Module, "train", lambda self, mode=True: (close_window(), real_train(self, mode))[1])
    yield seen, opened
    close_window()


def run_small(tmp_path, monkeypatch, *extra):
    monkeypatch.chdir(REPO)
    cfg = load_config(REPO / "configs" / "tiny.toml", SMALL + [f"--train.output_dir={tmp_path / 'run'}", *extra])
    return train(cfg)


@pytest.mark.parametrize("extra", [
    [],                                                                    # packed rows, shared prompt, fused
    ["--data.packing=false", "--data.share_prompt=false", "--model.fused_logprobs=false"],  # padded rows
    ["--reference.mode=live"],                                             # the reference scores each micro-batch
], ids=["packed-fused", "padded-unfused", "live-reference"])
def test_no_host_sync_in_a_micro_batch_step(tmp_path, monkeypatch, watch_steps, extra):
    seen, opened = watch_steps
    run_small(tmp_path, monkeypatch, *extra)
    # SFT steps, the reference passes of both sDPO steps and their DPO steps all opened a window.
    assert len(opened) >= 2 * 2 + 2 * 2
    assert not seen, sorted(set(seen))


def test_the_watch_sees_a_sync_in_the_model_and_the_kernel(tmp_path, monkeypatch, watch_steps):
    """The window covers code below the loop: without the host facts of the CPU batch, the
    model's right-padding test (.item()), nonzero() and the kernels' range check (bool()) show."""
    seen, _ = watch_steps
    real = reference.collate  # already the fixture's spy: it still closes the window

    def bare(*a, **k):
        b = real(*a, **k)
        return {k: v for k, v in b.items() if k not in ("right_padded", "gather_index", "token_range", "chosen_targets")}

    monkeypatch.setattr(reference, "collate", bare)  # the reference passes' batches only
    run_small(tmp_path, monkeypatch, "--data.packing=false", "--data.share_prompt=false", "--model.fused_logprobs=false")
    text = " ".join(seen)
    assert "item at model.py" in text and "nonzero at logprobs.py" in text and "__bool__ at __init__.py" in text, \
        sorted(set(seen))


def test_host_facts_match_what_the_device_would_compute():
    """collate's gather_index / right_padded / token_range equal the device-side computations."""
    from sdpo.data.pairs import TokenizedPair
    from sdpo.models.model import is_right_padded

    pairs = [TokenizedPair(prompt_ids=[5, 6, 7], chosen_ids=[8, 9], rejected_ids=[10, 11, 12, 13], index=0),
             TokenizedPair(prompt_ids=[1], chosen_ids=[2, 3, 4, 5, 6], rejected_ids=[7], index=1)]
    b = packing.collate(pairs, pad_id=0)
    labels = b["labels"]
    has_target = torch.zeros_like(labels, dtype=torch.bool)
    has_target[:, :-1] = labels[:, 1:] != packing.IGNORE_INDEX
    assert torch.equal(b["gather_index"], has_target.reshape(-1).nonzero().squeeze(1))
    assert b["right_padded"] is True and is_right_padded(b["attention_mask"])
    assert b["token_range"] == (0, 13)
    assert b["chosen_targets"] == 2 + 5
    p = packing.pack(pairs, pad_id=0)
    assert p["token_range"] == (int(p["input_ids"].min()), int(p["input_ids"].max()))
