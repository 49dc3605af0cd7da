"""Count the XLA programs a block of code compiles, by name: ``with CompileCount() as compiles:
...`` then ``compiles.total`` and ``compiles.of("_summed_cross_entropy")``.

JAX records the event ``/jax/core/compile/backend_compile_duration`` (``jax._src.dispatch.
BACKEND_COMPILE_EVENT``, the same name in jax 0.10 and 0.11) once per miss of its in-memory
executable caches, with the jitted function's name as ``fun_name`` (``jit(f)``); a persistent
compilation cache hit counts too (the program is still built for this process). The counter
listens to it through ``jax.monitoring``, so it costs nothing outside the block and needs no
``jax_log_compiles``. Compiles in other threads during the block count as well.
"""

from __future__ import annotations

from collections import Counter

import jax.monitoring

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCount:
    """The names of the programs compiled inside the ``with`` block, one entry per compile."""

    def __init__(self):
        self.names: list[str] = []

    def __enter__(self) -> CompileCount:
        jax.monitoring.register_event_duration_secs_listener(self._record)
        return self

    def __exit__(self, *exc_info) -> None:
        jax.monitoring.unregister_event_duration_listener(self._record)

    def _record(self, event: str, duration: float, **metadata) -> None:
        if event == BACKEND_COMPILE_EVENT:
            self.names.append(str(metadata.get("fun_name", "?")))

    @property
    def total(self) -> int:
        return len(self.names)

    def of(self, function_name: str) -> int:
        """Compiles of the function named ``function_name`` (``jit(name)``, or ``name`` as given)."""
        return sum(name in (function_name, f"jit({function_name})") for name in self.names)

    def __repr__(self) -> str:
        return f"CompileCount({dict(Counter(self.names))})"
