"""Move an existing export's inline UNet weights into external data files, without re-exporting.

An onnxruntime session of a graph whose weights are inline holds them about twice (measured on
a 119 MiB expert: 270 MiB of RSS against 153 MiB with external weights), which a memory budget
pays for every resident expert. Exports made since `ExportOptions.unet_external_data` already
store UNet weights externally; this rewrites an older export's UNets (fp32 and int8) the same
way, so it need not be exported again (an SD 2.1-sized export takes hours on a small CPU).

The export stays valid at every moment: the new graph and weights get new names
(``<name>.ext.onnx`` and ``<name>.ext.onnx.data``), the manifest is replaced atomically to list
them, and only then are the old graphs (listed by the old manifest, so ours) removed.

    python -m aptp.export.relayout EXPORT_DIR [--sign KEYFILE]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from aptp.cli import run_command
from aptp.errors import ConfigError

from .manifest import file_sha256, read_manifest, replace_manifest, unet_entries
from .onnx_export import consolidate_graph

__all__ = ["externalize_unet_weights"]

PROG = "python -m aptp.export.relayout"

logger = logging.getLogger(__name__)


def _graphs(manifest: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every UNet graph entry (fp32, and int8 where present) with a label for messages."""
    graphs = []
    for key, entry in unet_entries(manifest):
        graphs.append((f"{key} fp32", entry))
        if entry.get("int8"):
            graphs.append((f"{key} int8", entry["int8"]))
    return graphs


def externalize_unet_weights(root: str | os.PathLike, signing_key: Any = None) -> list[str]:
    """Rewrite every UNet graph of the export at `root` whose weights are inline so that they
    live in an external data file; returns the labels of the graphs rewritten.

    Raises:
        ArtifactError: the export is incomplete or modified (checked first).
        ConfigError: a signed export without `signing_key`.
    """
    root = Path(root).expanduser().absolute()
    manifest = read_manifest(root, verify=True)
    todo = [(label, entry) for label, entry in _graphs(manifest) if not entry.get("external_data")]
    if not todo:
        return []
    if manifest.get("signature") is not None and signing_key is None:
        raise ConfigError(f"{root} is signed and moving its UNet weights changes its manifest: pass the signing "
                          "key (--sign KEYFILE) to re-sign it")
    if signing_key is not None:
        from .signing import load_private_key

        signing_key = load_private_key(signing_key)
    files = dict(manifest["files"])
    old_paths = []
    for label, entry in tqdm(todo, desc="UNet weights to external data", leave=False):
        old = root / entry["unet"]
        new = old.with_name(f"{old.stem}.ext.onnx")
        data = consolidate_graph(old, new, 0, f"{new.name}.data")  # reads `old`, leaves it in place
        entry["unet"] = new.relative_to(root).as_posix()
        entry["external_data"] = data.relative_to(root).as_posix() if data else None
        for path in (new, data):
            if path is not None:
                files[path.relative_to(root).as_posix()] = file_sha256(path)
        if "sha256" in entry:
            entry["sha256"] = files[entry["unet"]]
        if "bytes" in entry:
            entry["bytes"] = sum(p.stat().st_size for p in (new, data) if p is not None)
        del files[old.relative_to(root).as_posix()]
        old_paths.append(old)
        logger.info("%s: weights moved to %s", label, data)
    manifest["files"] = files
    replace_manifest(root, manifest, signing_key)
    for old in old_paths:  # listed by the manifest just replaced: ours to remove
        old.unlink(missing_ok=True)
    return [label for label, _ in todo]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=PROG, description="Move an aptp export's inline UNet weights into "
                                     "external data files (onnxruntime then holds them once in memory).")
    parser.add_argument("export", type=Path, metavar="EXPORT_DIR", help="an export written by aptp-export")
    parser.add_argument("--sign", type=Path, metavar="KEYFILE", help="re-sign the manifest with this Ed25519 key")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    def run() -> None:
        done = externalize_unet_weights(args.export, signing_key=args.sign)
        print(f"{len(done)} UNet graphs now keep their weights in external data files"
              + (f": {', '.join(done)}" if done else " (all already did)"))

    return run_command(PROG, run, interrupted=f"interrupted; {args.export} still lists its previous graphs")


if __name__ == "__main__":
    sys.exit(main())
