"""attnlrp_fast.cli is attnlrp_fast.app.cli (the module itself, so that monkeypatching reaches it);
`python -m attnlrp_fast.cli ...` runs the command."""

import sys

from attnlrp_fast.app import cli as _m

if __name__ == "__main__":
    sys.exit(_m.main())
sys.modules[__name__] = _m
