"""Ahead-of-time compile of every kernel for sm_80 and sm_90 on a machine without
a GPU: catches GPU-only compile errors and reports registers and spills.

    python -m kernels.aot_check           # markdown table; TRITON_INTERPRET must be unset

Spills come from ptxas's own report (`ptxas -v`, the ptxas Triton itself uses
for that architecture) on the PTX Triton generated; the CompiledKernel only
learns n_spills when a driver loads the cubin, which needs a GPU.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile

_PTR = {"float32": "*fp32", "bfloat16": "*bf16", "float16": "*fp16"}
# Vocabularies whose launch config is compiled: a small one (single block),
# the real ones (BLOCK capped at 4096), and the fused lm_head path's backward, which
# launches the backward kernel on [c, Vb] slices of W's rows, Vb = CUDA_VOCAB_BLOCK (kernels/fused_linear.py;
# its forward launches on full [c, V] rows, as above).
VOCABS = (123, 32000, 128256, 16384)


def _signature(kernel_name: str, dtype: str) -> dict[str, str]:
    ptr = _PTR[dtype]
    if kernel_name == "logprobs_fwd_kernel":
        return {"logits_ptr": ptr, "targets_ptr": "*i64", "out_ptr": "*fp32", "max_ptr": "*fp32", "logsum_ptr": "*fp32",
                "stride_row": "i64", "V": "i32", "ignore_index": "i32", "softcap": "fp32",
                "BLOCK": "constexpr", "HAS_SOFTCAP": "constexpr"}
    return {"logits_ptr": ptr, "grad_ptr": ptr, "targets_ptr": "*i64", "max_ptr": "*fp32", "logsum_ptr": "*fp32",
            "grad_out_ptr": "*fp32", "stride_row": "i64", "stride_grad_row": "i64", "V": "i32",
            "ignore_index": "i32", "softcap": "fp32", "BLOCK": "constexpr", "HAS_SOFTCAP": "constexpr"}


def _ptxas_report(ptx: str, capability: int) -> dict[str, int]:
    from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability

    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([get_ptxas(capability).path, "-v", f"--gpu-name={sm_arch_from_capability(capability)}",
                              src, "-o", os.path.join(tmp, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed for sm_{capability}:\n{log}")
    regs = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    if not (regs and spills and stack):
        raise RuntimeError(f"could not parse the ptxas -v report:\n{log}")
    return {"registers": int(regs.group(1)), "spill_stores": int(spills.group(1)),
            "spill_loads": int(spills.group(2)), "stack_bytes": int(stack.group(1))}


def compile_all(capabilities=(80, 90)) -> list[dict]:
    from . import logsoftmax_gather as lg

    if lg.INTERPRET:
        raise RuntimeError("kernels.aot_check: TRITON_INTERPRET=1 was set when triton was imported; "
                           "run this in a process without it (the interpreter replaces @triton.jit)")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    configs = sorted({lg.launch_config(v) for v in VOCABS})
    rows = []
    for kernel in (lg.logprobs_fwd_kernel, lg.logprobs_bwd_kernel):
        name = kernel.fn.__name__ if hasattr(kernel, "fn") else kernel.__name__
        for dtype in _PTR:
            for (block, num_warps), softcap in [(c, False) for c in configs] + [(configs[-1], True)]:
                for cap in capabilities:
                    sig = _signature(name, dtype)
                    # What the launcher's specialisation gives at real sizes: 16-byte aligned
                    # pointers, row strides and V divisible by 16 (32000 and 128256 are), which
                    # lets the loads vectorise (more registers: the case to check for spills).
                    attrs = {(i,): [["tt.divisibility", 16]] for i, (arg, ty) in enumerate(sig.items())
                             if ty.startswith("*") or arg in ("stride_row", "stride_grad_row", "V")}
                    src = ASTSource(fn=kernel, signature=sig, constexprs={"BLOCK": block, "HAS_SOFTCAP": softcap}, attrs=attrs)
                    compiled = triton.compile(src, target=GPUTarget("cuda", cap, 32),
                                              options={"num_warps": num_warps})
                    if not compiled.asm.get("cubin"):
                        raise RuntimeError(f"{name} {dtype} sm_{cap}: no cubin produced")
                    rows.append({"kernel": name, "dtype": dtype, "arch": f"sm_{cap}", "BLOCK": block,
                                 "softcap": softcap,
                                 "num_warps": num_warps, **_ptxas_report(compiled.asm["ptx"], cap)})
    return rows


def main(argv: list[str]) -> None:
    rows = compile_all()
    if "--json" in argv:
        print(json.dumps(rows))
        return
    cols = ["kernel", "dtype", "arch", "BLOCK", "softcap", "num_warps", "registers", "spill_stores", "spill_loads", "stack_bytes"]
    print("| " + " | ".join(cols) + " |")
    print("|" + " --- |" * len(cols))
    for r in rows:
        print("| " + " | ".join(str(r[c]) for c in cols) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
