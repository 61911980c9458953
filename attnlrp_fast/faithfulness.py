"""attnlrp_fast.faithfulness is attnlrp_fast.evaluation.faithfulness (the module itself, so that monkeypatching
reaches it)."""

import sys

from attnlrp_fast.evaluation import faithfulness as _m

sys.modules[__name__] = _m
