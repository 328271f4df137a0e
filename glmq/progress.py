"""Progress bars on stderr (tqdm), switched off for ``--json`` output and when stderr is not a terminal
(logs and scripts then see only results and one-line errors)."""

from __future__ import annotations

import sys


class ByteProgress:
    """A byte-counting progress bar; a no-op when disabled."""

    def __init__(self, total: int, desc: str, *, enabled: bool = True):
        self._bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                             dynamic_ncols=True, leave=False)

    def update(self, n: int) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def __enter__(self) -> ByteProgress:
        return self

    def __exit__(self, *exc) -> None:
        if self._bar is not None:
            self._bar.close()


class StageProgress:
    """One progress bar per pipeline stage (AR, glyph, DiT steps, VAE); a no-op when disabled."""

    def __init__(self, *, enabled: bool = True):
        self.enabled = enabled and sys.stderr.isatty()
        self._bar = None

    def stage(self, name: str, total: int | None = None, unit: str = "step") -> None:
        self.close()
        if self.enabled:
            from tqdm import tqdm

            self._bar = tqdm(total=total, desc=name, unit=unit if total else "", leave=False, dynamic_ncols=True)

    def step(self) -> None:
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
