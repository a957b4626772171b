"""Building blocks shared by the architectures: attention, rotary embeddings, MLPs, decoders, vision blocks."""

__all__: list[str] = []
