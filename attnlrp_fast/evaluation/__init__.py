"""The faithfulness evaluation: is an explanation faithful to the model?

  evaluate       attribution methods on one footing (AttnLRP, CP-LRP, gradient x input, integrated gradients, the
                 last layer's attention, random), perturbation curves and their ABPC, pointing at known evidence
  capture        the last attention layer's query and key, recorded through an attention implementation of its
                 own (the attention baseline), so the engine's attention holds no hook for it
  deletion       RISE, MAS and RISE+AP of a generation's log-probability, from their definitions
  recall         associative recall: a ground-truth task and the tiny Llama trained on it (weights shipped in
                 attnlrp_fast/data/recall_llama)
  reasoning_recall  the same task answered through a reasoning token, and the tiny Llama trained on it (weights
                 in attnlrp_fast/data/recall_reasoning_llama): multi-hop relevance against one hop
  faithfulness   the shipped benchmarks (recall, MiniLM sentence pairs, reasoning) and a user's own model and document, as
                 `attnlrp-fast evaluate` runs them

It sits on top of the core (af.explain, af.lrp, the bindings) and nothing in the core imports it. The old paths
attnlrp_fast.evaluate, .faithfulness and .recall still import (as these same modules), and
`python -m attnlrp_fast.recall train` still trains.
"""
