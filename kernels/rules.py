"""The explanation rules of the attention kernels, as numbers: the one table every fast path reads.

For O = softmax(cap(scale * Q K^T)) V, each rule's modified gradient is a fixed multiple of the exact one
(attnlrp_fast/rules.py says why, with the paper's equations):
  grad     the exact gradients
  attnlrp  uniform rule on P V (dV and dP halved) and on Q K^T (dQ and dK halved again), Taylor rule on the
           softmax (its exact gradient), identity rule on the softcap's tanh (cap'(u) -> cap(u) / u)
  cp       CP-LRP: the attention weights are constants (dQ = dK = 0, dV exact)
The Triton kernels (attention_bwd.py) and the CPU torch path (attnlrp_fast.bindings.torch_path) scale by
ATTENTION_FACTORS; the float64 oracle (attnlrp_fast/reference.py) derives its gradients from the rules by autograd
and a test checks this table against it.
"""

RULES = ("grad", "attnlrp", "cp")
RULE_IDS = {rule: i for i, rule in enumerate(RULES)}   # passed to the kernels as a constexpr

# rule -> (factor on dQ and dK, factor on dV), relative to the exact gradient (the softcap's derivative per rule)
ATTENTION_FACTORS = {"grad": (1.0, 1.0), "attnlrp": (0.25, 0.5), "cp": (0.0, 1.0)}

# rule -> factor on the gradient of the softmax's own inputs other than Q K^T (an attention sink's learned logit):
# the uniform rule on P V halves it under attnlrp, CP-LRP holds P constant
SOFTMAX_INPUT_FACTORS = {"grad": 1.0, "attnlrp": 0.5, "cp": 0.0}

# rules whose softcap derivative is the identity rule's cap(u) / u instead of 1 - tanh^2
SOFTCAP_IDENTITY = ("attnlrp",)
