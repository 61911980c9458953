"""ViT (image classification): LayerNorm, GELU MLP, bidirectional attention. With gamma=... the linear layers
of the transformer layers take the gamma rule (W + gamma W+), as the AttnLRP paper does for vision transformers."""

from .common import FamilyMap

VIT = FamilyMap(name="vit", model_types=("vit",), layer_norms=("LayerNorm",), containers=("ViTMLP",),
                gamma_scope="layers")
