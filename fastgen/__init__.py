"""fastgen: fast generation for diffusion and flow models."""

__version__ = "0.1.0"
