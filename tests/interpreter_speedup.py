"""Triton's interpreter, without its repeated set-up inside a kernel (tests only).

Under ``TRITON_INTERPRET=1`` every call of a ``@triton.jit`` function, down to ``tl.sum`` and
``tl.max`` (themselves jit functions), re-patches ``triton.language`` for the interpreter: an
``inspect.getmembers`` of ``tl``, ``tl.tensor`` and ``tl.math`` each time, more than half of
the time our column-blocked kernels take on the CPU. Inside a running kernel those modules are
already patched, and a repeat changes nothing: the builtins are no longer builtins (so they
are skipped) and the rest is set again to closures equal to the ones in place. ``install``
skips the repeats: within a kernel's grid, a device function whose language modules were
already patched there is called without patching them again; the kernel's own patch (and its
restore at the end), a device function that brings a module not yet patched (``tl.core``,
which ``tl.sum`` sees), and any call outside a kernel go through triton as they are.

Results are those of the plain interpreter (the kernel suites pass either way;
``SAMPLERS_PLAIN_INTERPRETER=1`` turns this off to check). Installed by ``conftest.py`` and by
``fuzz.py``'s kernel mode; does nothing on other triton releases than 3.4-3.9 (read and
checked against those: 3.6-3.9 patch within a scope that the kernel restores at its end, 3.4
and 3.5 patch for good, and from the second call on every patch is a repeat there too).
"""

from __future__ import annotations

import operator
import os
from functools import partial

#: The triton releases whose interpreter this was read against.
_CHECKED_ON = ("3.4.", "3.5.", "3.6.", "3.7.", "3.8.", "3.9.")


def install() -> bool:
    """Patch triton's interpreter as described above; True if it was (or already is) patched."""
    if os.environ.get("SAMPLERS_PLAIN_INTERPRETER") == "1":
        return False
    try:
        import triton
        from triton.runtime import interpreter
    except ImportError:
        return False
    if not triton.__version__.startswith(_CHECKED_ON):
        return False
    executor = getattr(interpreter, "GridExecutor", None)
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if executor is None or patch_lang is None:
        return False
    if getattr(patch_lang, "_skips_repeats", False):
        return True
    tl = interpreter.tl
    patched = [0]  # the language modules patched in the running kernel: 1 tl, 2 tl.core
    running = [False]

    def langs_of(fn) -> int:
        # Looked up on every call: a function's globals gain names (``tl`` among them) when
        # the interpreter first rewrites it. Identity only (``in`` would call ``__eq__`` of
        # arrays and tensors).
        names = fn.__globals__.values()
        return (any(map(partial(operator.is_, tl), names))
                | any(map(partial(operator.is_, tl.core), names)) << 1)

    class _NothingToRestore:
        def restore(self) -> None:
            pass

    def patch_once(fn):
        if not running[0]:
            return patch_lang(fn)
        langs = langs_of(fn)
        if langs and langs & ~patched[0] == 0:
            return _NothingToRestore()
        scope = patch_lang(fn)
        patched[0] |= langs
        return scope

    run_grid = executor.__call__

    def run_grid_patching_once(self, *args, **kwargs):
        running[0], patched[0] = True, 0
        try:
            return run_grid(self, *args, **kwargs)
        finally:
            running[0], patched[0] = False, 0

    patch_once._skips_repeats = True
    interpreter._patch_lang = patch_once
    executor.__call__ = run_grid_patching_once
    return True
