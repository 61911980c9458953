"""attnlrp_fast.report is attnlrp_fast.app.report (the module itself, so that monkeypatching reaches it)."""

import sys

from attnlrp_fast.app import report as _m

sys.modules[__name__] = _m
