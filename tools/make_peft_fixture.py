"""Writes tests/fixtures/peft/peft_<version>_llama_r4.json: the adapter_config.json, tensor names and
shapes, and safetensors metadata that peft saves for a 1-layer Llama with r=4, alpha=8 on all seven
projections. Needs transformers + peft (not sdpo dependencies):  python tools/make_peft_fixture.py OUT.json"""
import json, os, sys, tempfile
from transformers import LlamaConfig, LlamaForCausalLM
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
out = sys.argv[1]
m = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
pm = get_peft_model(m, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
     target_modules=["q_proj","k_proj","v_proj","o_proj","gate_proj","up_proj","down_proj"]))
d = tempfile.mkdtemp(); pm.save_pretrained(d)
cfg = json.load(open(os.path.join(d, "adapter_config.json")))
with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
    tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}; meta = f.metadata()
json.dump({"adapter_config": cfg, "tensors": tensors, "metadata": meta}, open(out, "w"), indent=1, sort_keys=True)
