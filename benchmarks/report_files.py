"""How every suite writes its results: the JSON (atomically, NumPy values as lists), the Markdown
rendering and the plot, side by side in one folder."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping

__all__ = ["save_figure", "write_json", "write_report_files"]

logger = logging.getLogger(__name__)


def write_report_files(results: Mapping[str, Any], directory: str | os.PathLike, names: tuple[str, str, str],
                       render_markdown: Callable[[Mapping[str, Any]], str],
                       render_plot: Callable[[Mapping[str, Any], Path], Any]) -> dict[str, Path]:
    """Every suite's report set: `results` as JSON (atomic), Markdown and a plot in `directory`,
    under the (json, markdown, plot) file `names`; returns their paths by kind."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(("json", "markdown", "plot"), (directory / name for name in names)))
    write_json(results, paths["json"])
    paths["markdown"].write_text(render_markdown(results))
    render_plot(results, paths["plot"])
    logger.info("reports written to %s", directory)
    return paths


def save_figure(fig: Any, path: str | os.PathLike) -> Path:
    """Lay `fig` out, write it to `path` and close it (pyplot keeps every open figure otherwise)."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_json(results: Mapping[str, Any], path: str | os.PathLike) -> Path:
    """`results` as indented JSON at `path`, through a temp file and a rename (never half-written)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(results, indent=2, default=_json_default))
    os.replace(tmp, path)
    return path


def _json_default(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
