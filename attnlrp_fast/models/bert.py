"""BERT and RoBERTa (sequence classification, masked LM, plain encoders such as MiniLM): LayerNorm,
GELU intermediate, tanh pooler (identity rule), bidirectional attention with a padding mask."""

from .common import FamilyMap

BERT = FamilyMap(name="bert", model_types=("bert", "roberta"), layer_norms=("LayerNorm",))
