"""dsalite: a PyTorch-native stack for the DSA family of sparse-attention MoE models."""

from dsalite.config import ConfigError, ModelConfig
from dsalite.model import Output, Transformer

__version__ = "0.1.0"


def from_pretrained(path, dtype=None, device="cpu"):
    """Load an HF checkpoint directory, or a `.gguf` file, into a dsalite `Transformer` (see `dsalite.checkpoint`)."""
    import torch

    if str(path).endswith(".gguf"):
        from dsalite.checkpoint.gguf import load

        return load(path, dtype=torch.float32 if dtype is None else dtype, device=device)

    from dsalite.checkpoint.pretrained import from_pretrained as _load

    return _load(path, dtype=torch.float32 if dtype is None else dtype, device=device)


def generate(model, input_ids, max_new_tokens=32, **kwargs):
    """Input ids followed by new ids (see `dsalite.inference.engine.generate` for every option)."""
    from dsalite.inference.engine import generate as _generate

    return _generate(model, input_ids, max_new_tokens, **kwargs)


__all__ = ["ConfigError", "ModelConfig", "Output", "Transformer", "from_pretrained", "generate", "__version__"]
