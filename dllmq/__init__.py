"""dllmq: post-training quantization for diffusion language models (LLaDA, Dream).

    import dllmq
    model = dllmq.load("./LLaDA-8B-Instruct-w4")     # quantized or full-precision folder, or "tiny"
"""

__version__ = "0.1.0"


def load(path=None, device="cpu", dtype=None, verify: bool = True, **kw):
    """Load a dllmq checkpoint (real quantized linears) or a full-precision model folder / Hub id."""
    from .runtime.loader import load as _load

    return _load(path, device=device, dtype=dtype, verify=verify, **kw)


__all__ = ["load", "__version__"]
