"""What a model is: the decoder and its pieces, masks, generation, LoRA, HF directories in and out.

Imports nothing of sdpo.data, sdpo.eval, sdpo.runtime or the method."""
