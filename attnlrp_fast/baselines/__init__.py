"""Other ways to compute what the engine computes, kept for contrast: they sit beside the core (they may import it and
the bindings) and below everything that compares against them (the memory estimate's contrast modes, the
benchmarks).

  lxt_style    AttnLRP as Python patches around torch ops, the reference implementation's approach
"""
