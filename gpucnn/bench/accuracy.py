"""Time to accuracy: training time until the MNIST test accuracy first reaches a target."""
from __future__ import annotations

from .. import backend, models
from ..data import load_arrays
from ..data.batching import epoch_permutation, steps_per_epoch
from ..random import seed as _seed
from ..train import Schedule, TrainConfig, Trainer, evaluate, make_optimizer
from ..train.loop import augment_spec
from ..timing import Timer

__all__ = ["time_to_accuracy"]


def time_to_accuracy(target, seeds, device, epochs=3, eval_every=200, batch_size=64, log=print):
    """Training time until the test accuracy first reaches ``target``, per seed.

    The normalised MNIST arrays live on ``device``; the loop is
    ``gpucnn train``'s (:class:`~gpucnn.train.Trainer`, same defaults,
    schedule, shuffling and random shifts), but the test set is evaluated every
    ``eval_every`` steps with the clock stopped, so only training time counts
    (CUDA events on the GPU; kernels are compiled before the clock starts).

    Returns a list of ``(seed, seconds or None, steps, accuracy)``.
    """
    x_tr, y_tr, x_te, y_te, _ = load_arrays("mnist", device=device)
    n = int(x_tr.shape[0])
    spe = steps_per_epoch(n, batch_size)
    timer = Timer(device, 0, 1)
    rows = []
    for seed in seeds:
        cfg = TrainConfig(model="lenet5", epochs=epochs, batch_size=batch_size, seed=seed).resolved()
        _seed(seed)
        model = models.build(cfg.model, device=device)
        loss = models.make_loss(cfg.model)
        loss.check_labels = False
        trainer = Trainer(model, loss, make_optimizer(cfg, model), batch_size=batch_size,
                          schedule=Schedule(cfg, spe), augment=augment_spec(cfg))
        elapsed, steps, acc, reached = 0.0, 0, 0.0, None
        for epoch in range(cfg.epochs):
            order = backend.to_device(epoch_permutation(seed, epoch, n), device)
            for start in range(0, spe, eval_every):
                chunk = range(start, min(start + eval_every, spe))
                elapsed += timer(lambda: trainer.run_steps(x_tr, y_tr, order, epoch, chunk, spe))
                steps += len(chunk)
                acc = evaluate(model, x_te, y_te)["accuracy"]
                if acc >= target:
                    reached = elapsed
                    break
            if reached is not None:
                break
        log(f"  seed {seed}: " + (f"{target:.2%} after {reached:.2f} s ({steps} steps)" if reached is not None
                                  else f"not reached in {cfg.epochs} epochs (best so far {acc:.2%})"))
        rows.append((seed, reached, steps, acc))
    return rows
