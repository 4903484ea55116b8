"""peft's LoRA names for a family with fused projections (Phi-3's qkv_proj, gate_up_proj).

Writes tests/fixtures/peft/peft_<version>_phi3_all_linear.json: the target modules peft picks for
target_modules="all-linear" (every projection but lm_head; peft has no phi3 default), and the adapter tensors'
names and shapes it saves, for the tiny Phi-3 fixture (tests/fixtures/hf_reference/phi3).
tests/test_families.py checks that sdpo's default LoRA targets on that model write the same.
Needs transformers + peft (not sdpo dependencies):
    /opt/hf/bin/python tools/make_peft_family_fixture.py
"""

import json
import os
import tempfile
from pathlib import Path

import peft
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]
model = AutoModelForCausalLM.from_pretrained(ROOT / "tests" / "fixtures" / "hf_reference" / "phi3")
pm = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, task_type="CAUSAL_LM",
                                      target_modules="all-linear"))  # peft has no phi3 default
d = tempfile.mkdtemp()
pm.save_pretrained(d)
cfg = json.load(open(os.path.join(d, "adapter_config.json")))
with safe_open(os.path.join(d, "adapter_model.safetensors"), "pt") as f:
    tensors = {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
out = ROOT / "tests" / "fixtures" / "peft" / f"peft_{peft.__version__}_phi3_all_linear.json"
out.write_text(json.dumps({"target_modules": sorted(cfg["target_modules"]), "tensors": tensors}, indent=1,
                          sort_keys=True) + "\n")
print(f"wrote {out}: targets {sorted(cfg['target_modules'])}, {len(tensors)} tensors")
