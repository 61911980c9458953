"""The faithfulness evaluation: is an explanation faithful to the model?

  evaluate       attribution methods on one footing (AttnLRP, CP-LRP, gradient x input, integrated gradients, the
                 last layer's attention, random and the paper baselines), perturbation curves and their ABPC,
                 pointing at known evidence
  capture        the last attention layer's query and key, recorded through an attention implementation of its
                 own (the attention baseline), so the engine's attention holds no hook for it
  paper_baselines  the AttnLRP paper's baselines: AtMan (its own attention implementation, scores suppressed per
                 token), SmoothGrad x input, attention rollout and Grad x AttnRoll (every layer's attention recorded,
                 carried as one row)
  deletion       RISE, MAS and RISE+AP of a generation's log-probability, from their definitions
  recall         associative recall: a ground-truth task and the tiny Llama trained on it (weights shipped in
                 attnlrp_fast/data/recall_llama)
  reasoning_recall  the same task answered through a reasoning token, and the tiny Llama trained on it (weights
                 in attnlrp_fast/data/recall_reasoning_llama): multi-hop relevance against one hop
  tiny_task      what those two share: the tiny Llama's training loop, the word tokenizer, the shipped-model
                 loader and the `train|check` command line
  needle         a fact inserted into the sample report at 1k to 8k tokens, asked of a real instruct LLM (SmolLM2):
                 pointing at the needle sentence, its rank and share, ABPC and the deletion metrics of the answer
  faithfulness   the shipped benchmarks (recall, MiniLM sentence pairs, reasoning, needle) and a user's own model and
                 document, as `attnlrp-fast evaluate` runs them

It sits on top of the core (af.explain, af.lrp, the bindings, the baselines) and nothing in the core imports it;
neither it nor attnlrp_fast.integrations imports the other.
"""
