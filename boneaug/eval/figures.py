"""Figure 3 of the paper: original, translated and blended, as full image and as patch."""

from __future__ import annotations

import io

import numpy as np

from boneaug import storage
from boneaug.data.arrays import decode_pixels


def figure3(*, data_uri: str, run_uri: str, candidates_uri: str, out_png: str,
            n: int = 3) -> str | None:
    """A grid with, per example, the full original / translated-pasted / blended image and the
    crop box of each, for the `n` highest-scoring blended candidates. Returns `out_png`, or None
    (nothing written) when there are no candidates."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    from boneaug.augment.blend import paste_blended, resize
    from boneaug.augment.pipeline import blend_mode
    from boneaug.io.dicom import decode_xray

    candidates = storage.read_parquet(candidates_uri).sort_by([("score", "descending")]).slice(0, n)
    images = storage.read_parquet(storage.join(run_uri, "images"),
                                  columns=["image_id", "key"]).to_pydict()
    keys = dict(zip(images["image_id"], images["key"], strict=True))
    rows = candidates.to_pylist()
    if not rows:
        return None
    fig = Figure(figsize=(9, 4.2 * len(rows)), dpi=110)
    for r, row in enumerate(rows):
        uri = storage.join(data_uri, keys[row["source_image_id"]])
        original = decode_xray(storage.read_bytes(uri), path=uri).pixels
        side = int(np.sqrt(len(row["translated"]) // 2))
        translated = decode_pixels(row["translated"], side, side)
        x0, y0, x1, y1 = row["crop"]
        pasted = original.copy()
        pasted[y0:y1, x0:x1] = resize(translated, y1 - y0, x1 - x0)
        blended = paste_blended(original, translated, row["crop"], n=row["n"],
                                mode=blend_mode(row))
        pad = (x1 - x0) // 2
        zoom = (slice(max(0, y0 - pad), y1 + pad), slice(max(0, x0 - pad), x1 + pad))
        for c, (title, image) in enumerate((("original", original), ("translated", pasted),
                                            ("blended", blended))):
            for k, (view, crop) in enumerate(((image, None), (image[zoom], zoom))):
                ax = fig.add_subplot(2 * len(rows), 3, (2 * r + k) * 3 + c + 1)
                ax.imshow(view, cmap="gray", vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if crop is None:
                    ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                           edgecolor="white", lw=0.8))
                    ax.set_title(f"{title}" + (f"  (score {row['score']:.2f})" if c == 2 else ""),
                                 fontsize=8)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    storage.write_bytes(out_png, buffer.getvalue())
    return out_png
