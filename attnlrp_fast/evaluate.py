"""attnlrp_fast.evaluate is attnlrp_fast.evaluation.evaluate (the module itself, so that monkeypatching reaches
it)."""

import sys

from attnlrp_fast.evaluation import evaluate as _m

sys.modules[__name__] = _m
