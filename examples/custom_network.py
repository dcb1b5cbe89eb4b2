"""Build your own network from gpucnn layers and train it with the train API.

Any :class:`gpucnn.layers.Sequential` works: here conv-PReLU-maxpool twice,
then a dense classifier with a LeakyReLU.  ``train`` takes the model object
(``config.model`` is then just a label) and uses softmax cross-entropy unless
given another loss; it checkpoints, evaluates and logs exactly as for the
built-in models.  Seed *before* building the network: the initial weights
come from gpucnn's generator.

    python examples/custom_network.py [--epochs 1] [--subset 10000]

Reload the weights later with::

    from gpucnn import checkpoint
    ckpt = checkpoint.load_checkpoint("runs/custom/checkpoint.npz")
    net = build()                       # the same architecture
    checkpoint.load_into(ckpt, net)     # refuses another architecture, listing the mismatches
"""
from __future__ import annotations

import argparse

import gpucnn as gc
from gpucnn.layers import Conv2D, Dense, Flatten, LeakyReLU, MaxPool2D, PReLU, Sequential
from gpucnn.train import TrainConfig, train


def build() -> Sequential:
    return Sequential(
        Conv2D(1, 8, 3, padding=1), PReLU(8), MaxPool2D(2),      # 8 x 14 x 14
        Conv2D(8, 16, 3, padding=1), PReLU(16), MaxPool2D(2),    # 16 x 7 x 7
        Flatten(),
        Dense(16 * 7 * 7, 64), LeakyReLU(0.01),
        Dense(64, 10),
        name="custom",
    )


def main(argv=None):
    p = argparse.ArgumentParser(description="train a custom conv-PReLU-maxpool network on MNIST")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--subset", type=int, default=10000)
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="runs/custom")
    args = p.parse_args(argv)

    gc.seed(0)
    net = build()
    print(net)
    cfg = TrainConfig(model="custom", optimizer="adam", lr=2e-3, epochs=args.epochs, subset=args.subset or None)
    result = train(cfg, model=net, device=args.device, out_dir=args.out, overwrite=True)
    print(result.summary())
    return result


if __name__ == "__main__":
    main()
