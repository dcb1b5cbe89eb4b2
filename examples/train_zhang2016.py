"""Train ``zhang2016`` exactly as seed 000 derives it, through the train API.

The network: conv 1->6 5x5, sigmoid, mean pool 2, conv 6->12 5x5, sigmoid,
mean pool 2, flatten 192, dense 10, sigmoid -- trained with plain SGD (no
momentum, no weight decay, constant learning rate) on the squared error
``1/2 ||sigmoid(z) - onehot(y)||^2`` (``gpucnn.models.make_loss("zhang2016")``
is :class:`gpucnn.losses.MSE`; the training loop turns labels into one-hot
targets with :func:`gpucnn.losses.one_hot`).

Settings: lr 2.0, batch 16, 5 epochs, seed 0.  The MSE gradient through a
sigmoid output is small (it carries sigma'(z) <= 1/4 and the batch mean), hence
the large learning rate; small batches give the many updates this slow loss
needs.  Measured on a 2-vCPU Intel Xeon VM (2026-12-01), seeds 0-4: 98.29,
98.29, 98.32, 98.23, 98.19% after epoch 5 (mean 98.26%, min 98.19%); seed 0
took 53 s.  lr 1.0 (this script's earlier default) gives 97.86-98.30%, three seeds under 98%;
a cosine decay from 1.0 at 97.3%: this loss needs the large constant step.

    python examples/train_zhang2016.py [--epochs 5] [--device auto] [--out runs/zhang2016]

(``gpucnn train --model zhang2016 --epochs 3`` -- SGD with momentum 0.9, lr 1.0,
cosine schedule, batch 64, the CLI's defaults for this model -- reaches 97.65%
in 3 epochs; this script keeps to the seed's plain SGD.)

The same as this script from the command line:

    gpucnn train --model zhang2016 --optimizer sgd --lr 2.0 --momentum 0 --weight-decay 0 \\
                 --lr-schedule constant --warmup 0 --batch-size 16 --epochs 5
"""
from __future__ import annotations

import argparse

from gpucnn.train import TrainConfig, train


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--subset", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/zhang2016")
    args = p.parse_args(argv)

    cfg = TrainConfig(model="zhang2016", optimizer="sgd", lr=args.lr, momentum=0.0, weight_decay=0.0,
                      lr_schedule="constant", warmup=0, batch_size=args.batch_size, epochs=args.epochs,
                      seed=args.seed, subset=args.subset)
    result = train(cfg, device=args.device, out_dir=args.out, overwrite=True)
    print(result.summary())
    return result


if __name__ == "__main__":
    main()
