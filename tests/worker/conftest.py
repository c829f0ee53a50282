"""Without CUDA, Triton kernels run in Triton's interpreter: it must be chosen before triton is
imported (its own library functions are wrapped at import)."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        from triton.runtime import interpreter
    except ImportError:
        interpreter = None
    if interpreter is not None and hasattr(interpreter, "_patch_lang_tensor"):
        # Triton 3.6's interpreter turns a loop bound into an int with int(array of one element),
        # which numpy 2.4 refuses; the element's own item() says the same thing.
        _patch_tensor = interpreter._patch_lang_tensor

        def _patch_lang_tensor(tensor: type, scope: "interpreter._LangPatchScope") -> None:
            _patch_tensor(tensor, scope)
            scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.item()))

        interpreter._patch_lang_tensor = _patch_lang_tensor
