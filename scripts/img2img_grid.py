"""Write docs/img2img.png: init image, mask, img2img at three strengths, inpainting (tiny export).

    python scripts/img2img_grid.py EXPORT_DIR [OUT.png]

EXPORT_DIR is any aptp export with a VAE encoder (the tests' tiny export:
``tests/runtime_fixtures.tiny_export``). Torch-free: only the runtime runs. The init picture
and mask are the ones tests/test_img2img.py uses; every panel has seed 0, 10 DDIM steps.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_img2img import centre_mask, init_picture  # noqa: E402

from aptp.runtime import AptpPipeline  # noqa: E402
from aptp.runtime.images import contact_sheet, save_png  # noqa: E402

PROMPT = "a red sports car on a highway"
STRENGTHS = (0.3, 0.6, 0.9)


def main(export: str, out: str = "docs/img2img.png") -> None:
    pipe = AptpPipeline.from_export(export, threads=1)
    image, mask = init_picture(), centre_mask()
    common = dict(seeds=[0], steps=10, scheduler="ddim")
    panels = [image, np.dstack([mask] * 3)]
    panels += [pipe([PROMPT], init_image=image, strength=s, **common)[0].image for s in STRENGTHS]
    panels.append(pipe([PROMPT], init_image=image, mask_image=mask, strength=0.9, **common)[0].image)
    big = [np.kron(p, np.ones((2, 2, 1), dtype=np.uint8)) for p in panels]  # 64 px panels, shown at 128
    save_png(contact_sheet(big, columns=len(big), gap=4), out)
    print(f"wrote {out}: init, mask, img2img at strengths {STRENGTHS}, inpainting at 0.9")


if __name__ == "__main__":
    main(*sys.argv[1:])
