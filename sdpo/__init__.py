"""sdpo: stepwise DPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once", arXiv 2403.19270).

The method sits at this level, read from the top: stepwise.py (the driver) -> reference.py (the
reference pass) -> loop.py (the optimisation loop) -> logprobs.py (sequence log-probs) -> loss.py
(the preference losses) and metrics.py (γ, accuracies, rewards). Everything else is in a wing:

    models/   what a model is: the decoder, masks, generation, LoRA, HF directories in and out
    data/     what goes in: reading and checking files, tokenizers, pairs, packing
    eval/     what comes out: the H4 harness, log-likelihood requests, the report, plots
    runtime/  how a run is held together: config, torchrun / FSDP2, run state, trackers, memory plan

The rule the layout encodes (tests/test_layout.py checks it): the method may import the wings;
models/ imports nothing of data/, eval/, runtime/ or the method; data/ imports no model; eval/
may use the method's metrics and reference pass but never loop.py or stepwise.py; runtime/ never
imports loop.py or stepwise.py; no import circle anywhere. Package __init__ files are docstrings
only: import a name from the module that defines it.
"""
