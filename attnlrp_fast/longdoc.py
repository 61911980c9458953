"""attnlrp_fast.longdoc is attnlrp_fast.app.longdoc (the module itself, so that monkeypatching reaches it)."""

import sys

from attnlrp_fast.app import longdoc as _m

sys.modules[__name__] = _m
