"""attnlrp_fast.recall is attnlrp_fast.evaluation.recall (the module itself, so that monkeypatching reaches it);
`python -m attnlrp_fast.recall train|check` runs its command."""

import sys

from attnlrp_fast.evaluation import recall as _m

if __name__ == "__main__":
    sys.exit(_m.main())
sys.modules[__name__] = _m
