"""The ``vision20`` suite: 20 CLIP image-classification tasks from Hugging Face datasets, the SAIM
paper's task orders, open_clip backbones, and FusionBench expert import (``convert_hf_clip``)."""
