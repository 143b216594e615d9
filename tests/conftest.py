import os

import torch

# Triton kernels run in Triton's interpreter on CPU tensors; it must be on before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
