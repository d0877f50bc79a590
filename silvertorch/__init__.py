"""SilverTorch: Index-as-Model retrieval. The whole retrieval path is one ``nn.Module``.

Importing this package is cheap; subpackages import torch / torchrec on demand.
"""

__version__ = "0.1.0"
