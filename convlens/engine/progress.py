"""Progress bars for long commands (tqdm), or nothing."""

from __future__ import annotations


class NoBar:
    """A progress bar that shows nothing."""

    def update(self, n):
        pass

    def close(self):
        pass


def progress_bar(enabled: bool, total: int, *, unit: str = "img", desc: str = "", already: int = 0):
    """A tqdm bar of ``total`` units (``already`` done before, shown as resumed), or `NoBar`."""
    if not enabled or not total:
        return NoBar()
    from tqdm import tqdm
    return tqdm(total=total, unit=unit, desc=desc, dynamic_ncols=True, smoothing=0.1,
                postfix={"resumed": already} if already else None)
