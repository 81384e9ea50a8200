"""rynnscale: distributed training of Qwen3-VL-based embodied "brain" models (dense and MoE)."""

__version__ = "0.1.0"
