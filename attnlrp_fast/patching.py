"""Patch one instance, restore it exactly: the one place that sets attributes (forwards included) on live modules
and puts back what was there, or nothing where nothing was (an instance attribute that did not exist is removed,
so the class's own shows through again). af.lrp, af.low_memory, the long-document job and the evaluation's
captures all patch through it.

    patches = Patches()
    patches.set(module, "forward", new_forward)
    ...
    patches.restore()                # or: with Patches() as patches: ...
"""

_MISSING = object()


class Patches:
    """Attribute patches on object instances, undone in reverse order by restore() (safe to call twice)."""

    def __init__(self):
        self._saved = []   # (object, attribute, previous instance value or _MISSING)

    def set(self, obj, attr, value):
        self._saved.append((obj, attr, obj.__dict__.get(attr, _MISSING)))
        setattr(obj, attr, value)

    def restore(self):
        for obj, attr, previous in reversed(self._saved):
            if previous is _MISSING:
                obj.__dict__.pop(attr, None)
            else:
                setattr(obj, attr, previous)
        self._saved = []

    def __len__(self):
        return len(self._saved)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.restore()
        return False


# Forward hooks that change what a module computes (af.intervene) stand aside while a patch is checked against the
# module's own forward (af.lrp probes each replacement on random input): both sides must compute the same thing.
_HOOKS_PAUSED = [0]


class hooks_paused:
    """`with hooks_paused():` editing hooks that ask hooks_are_paused() do nothing (nestable)."""

    def __enter__(self):
        _HOOKS_PAUSED[0] += 1

    def __exit__(self, *exc):
        _HOOKS_PAUSED[0] -= 1
        return False


def hooks_are_paused():
    return _HOOKS_PAUSED[0] > 0
