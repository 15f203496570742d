"""facegan_dist: distributed face-GAN training (Accelerate + WebDataset + W&B)."""

__version__ = "0.1.0"
