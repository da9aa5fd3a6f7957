"""The case runner the interop scripts share: each case prints "ok   <name>" or
"FAIL <name>: <why>", a failure never stops the cases after it, and `finish()` exits with the
number of failed cases (interop.sh turns the lines into its tally)."""

import sys

_failed = 0


def case(name):
    """Decorator: runs the function at once as the case `name`."""

    def wrap(fn):
        global _failed
        try:
            fn()
            print(f"ok   {name}", flush=True)
        except Exception as e:  # noqa: BLE001 - any failure is reported, then the next case runs
            _failed += 1
            print(f"FAIL {name}: {type(e).__name__}: {e}", flush=True)
        return fn

    return wrap


def finish():
    sys.exit(_failed)
