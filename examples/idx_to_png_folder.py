"""Write MNIST or Fashion-MNIST out as an image folder of PNGs, to train on with ``--data-dir``.

    python examples/idx_to_png_folder.py --dataset mnist --train 6000 --test 1000 --out digits-png
    gpucnn train --data-dir digits-png --epochs 1          # the folder layout is recognised

The folder is ``OUT/train/<class>/<index>.png`` and ``OUT/test/<class>/<index>.png``, 28x28 gray,
one folder per class named after it ("0".."9" for MNIST; Fashion-MNIST's names with "/" made "-").
The first ``--train`` / ``--test`` images of each split are written, so training on the folder and
``gpucnn train --dataset NAME --subset N --test-subset M`` see the same images.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

import gpucnn as gc


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="mnist", choices=sorted(gc.data.DATASETS))
    p.add_argument("--data-dir", default=None, help="where the IDX files are (default: shipped / cache)")
    p.add_argument("--train", type=int, default=6000, help="training images to write (the first N)")
    p.add_argument("--test", type=int, default=1000, help="test images to write (the first N)")
    p.add_argument("--out", required=True, help="the folder to create")
    args = p.parse_args(argv)
    ds = gc.data.load_dataset(args.dataset, args.data_dir)
    out = Path(args.out)
    names = [c.replace("/", "-") for c in ds.classes]
    for split, x, y, n in (("train", ds.train_images, ds.train_labels, args.train),
                           ("test", ds.test_images, ds.test_labels, args.test)):
        for i in range(min(n, len(x))):      # a class folder only where it gets images (empty ones are errors)
            d = out / split / names[int(y[i])]
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i]).save(d / f"{i:05d}.png")
    print(f"wrote {out}: {min(args.train, len(ds.train_images))} training and "
          f"{min(args.test, len(ds.test_images))} test PNGs of {args.dataset}")
    return out


if __name__ == "__main__":
    main()
