"""attnlrp_fast.demo is attnlrp_fast.app.demo (the module itself, so that monkeypatching reaches it)."""

import sys

from attnlrp_fast.app import demo as _m

sys.modules[__name__] = _m
