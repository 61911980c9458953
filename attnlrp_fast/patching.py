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
