"""The held-out generator's command line and a contact sheet of a written set.

    python -m heldout OUT_DIR --train-ids 60 --test-ids 60 --images-per-id 10 --cameras 6 \\
        --camera-strength 1.0 --seed 0 [--preview sheet.png]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from PIL import Image

from heldout.layout import generate_heldout

__all__ = ["contact_sheet", "main"]


def contact_sheet(data_dir: str | Path, png_path: str | Path, *, folder: str = "bounding_box_train",
                  identities: int = 10, per_identity: int = 12) -> Path:
    """A PNG grid to look at: one row per identity, its images sorted by camera."""
    files = sorted((Path(data_dir) / folder).glob("*.jpg"))
    by_pid: dict[str, list[Path]] = {}
    for f in files:
        by_pid.setdefault(f.name.split("_")[0], []).append(f)
    rows = [sorted(v, key=lambda p: p.name.split("_")[1])[:per_identity] for v in list(by_pid.values())[:identities]]
    w, h = Image.open(rows[0][0]).size
    sheet = Image.new("RGB", (per_identity * (w + 2), len(rows) * (h + 2)), (255, 255, 255))
    for i, row in enumerate(rows):
        for j, path in enumerate(row):
            sheet.paste(Image.open(path).convert("RGB"), (j * (w + 2), i * (h + 2)))
    png_path = Path(png_path)
    sheet.save(png_path)
    return png_path


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m heldout", description="Write a held-out person re-ID set in "
                                 "the Market-1501 layout (read by dataset: folder).")
    ap.add_argument("out_dir", help="dataset folder to write (replaced if written by this generator)")
    ap.add_argument("--train-ids", type=int, default=60, help="train identities (default 60)")
    ap.add_argument("--test-ids", type=int, default=60, help="query/gallery identities (default 60)")
    ap.add_argument("--images-per-id", type=int, default=10, help="mean images per identity (default 10)")
    ap.add_argument("--cameras", type=int, default=6, help="number of cameras (default 6)")
    ap.add_argument("--camera-strength", type=float, default=1.0,
                    help="0..1: how far cameras' colour response and scenes depart from neutral (default 1)")
    ap.add_argument("--count-spread", type=float, default=0.3,
                    help="images per identity vary by this fraction around the mean; 0 = all equal (default 0.3)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--preview", help="also write a contact sheet PNG of train identities here")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    summary = generate_heldout(args.out_dir, num_train_ids=args.train_ids, num_test_ids=args.test_ids,
                               images_per_id=args.images_per_id, num_cameras=args.cameras,
                               camera_strength=args.camera_strength, seed=args.seed, height=args.height,
                               width=args.width, count_spread=args.count_spread)
    print(json.dumps({"counts": summary["counts"], "images_per_camera": summary["images_per_camera"],
                      "seconds": round(time.perf_counter() - t0, 2)}))
    if args.preview:
        print(f"preview: {contact_sheet(args.out_dir, args.preview)}")


if __name__ == "__main__":
    main()
