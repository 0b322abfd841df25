"""Plot helpers shared by the reports (matplotlib is imported by the callers, lazily).

matplotlib is an optional extra: without it the reports write their tables and skip the figures,
saying so with `MATPLOTLIB_MISSING`.
"""

from __future__ import annotations

import os
from pathlib import Path

# what a report says where it skips its figures (the same words as train's report.html)
MATPLOTLIB_MISSING = "matplotlib is not installed (pip install 'h2t-edge[train]')"


def have_matplotlib() -> bool:
    """Whether matplotlib can be imported (the figures need it; the tables do not)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def save_figure(fig, path: str | os.PathLike, dpi: int = 120) -> Path:
    """Lay out, write `fig` to the PNG `path` atomically (a temporary file, then a rename) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=dpi)
    plt.close(fig)
    os.replace(tmp, path)
    return path
