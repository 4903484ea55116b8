import os

# Triton kernels run under the interpreter on CPU tensors when no GPU is present.
# The variable must be set before triton is first imported.
try:
    import torch

    _has_cuda = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
