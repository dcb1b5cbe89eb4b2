"""Training-time augmentation: every image is a true shift (or mirrored shift) of its input,
the draws depend only on the key and each image's position, and the trainer applies them
reproducibly (resume included)."""
from __future__ import annotations

import numpy as np
import pytest

from gpucnn import checkpoint as ck
from gpucnn import data as gdata
from gpucnn.data.augment import augment_batch
from gpucnn.train import TrainConfig, read_metrics, train

FILL = -0.5


def _shifted(img, dy, dx, m=2, fill=FILL):
    """``img`` (C, H, W) moved down by dy and right by dx, the uncovered border filled."""
    C, H, W = img.shape
    pad = np.full((C, H + 2 * m, W + 2 * m), fill, img.dtype)
    pad[:, m:m + H, m:m + W] = img
    return pad[:, m - dy:m - dy + H, m - dx:m - dx + W]


def _which_shift(src, out, flips=(False,)):
    """The (dy, dx, flipped) that turns ``src`` into ``out`` exactly, or None."""
    for flip in flips:
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                cand = _shifted(src, dy, dx)
                if flip:
                    cand = cand[..., ::-1]
                if np.array_equal(cand, out):
                    return dy, dx, flip
    return None


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    return rng.standard_normal((200, 2, 9, 11)).astype(np.float32)   # no symmetric image: every match is unique


def test_every_image_is_a_shift_of_its_input_and_all_shifts_occur(batch):
    before = batch.copy()
    out = augment_batch(batch, (1, 2, 3), fill=FILL)
    assert out.shape == batch.shape and out.dtype == batch.dtype
    np.testing.assert_array_equal(batch, before)                       # the input is not touched
    shifts = [_which_shift(s, o) for s, o in zip(batch, out)]
    assert None not in shifts
    assert {(dy, dx) for dy, dx, _ in shifts} == {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}


def test_draws_depend_only_on_the_key_and_the_position(batch):
    a = augment_batch(batch, (7, 1), fill=FILL)
    np.testing.assert_array_equal(a, augment_batch(batch.copy(), (7, 1), fill=FILL))
    assert not np.array_equal(a, augment_batch(batch, (7, 2), fill=FILL))       # next epoch
    assert not np.array_equal(a, augment_batch(batch, (8, 1), fill=FILL))       # other seed
    assert not np.array_equal(a, augment_batch(batch, (7, 1), fill=FILL, start=1))


def test_a_batch_augmented_in_pieces_is_the_batch_augmented_whole(batch):
    """Image n's shift depends on its position start + n alone: the shares of any split (the
    batches of an epoch, the ranks' shards of a batch) see what the whole sees."""
    whole = augment_batch(batch, (7, 1), fill=FILL, flip=True, start=640)
    for cuts in ([0, 200], [0, 100, 200], [0, 67, 134, 200], [0, 1, 199, 200]):
        pieces = [augment_batch(batch[a:b], (7, 1), fill=FILL, flip=True, start=640 + a)
                  for a, b in zip(cuts, cuts[1:])]
        np.testing.assert_array_equal(np.concatenate(pieces), whole)


def test_bad_start_is_refused(batch):
    for bad in (-1, 1.5, True, "2", 2 ** 62, 2 ** 63):     # 2**63: an OverflowError in NumPy's uint64 before
        with pytest.raises(ValueError, match=r"start must be an int in \[0, 2\*\*62\), got start="):
            augment_batch(batch, (0,), fill=FILL, start=bad)


def test_flip_mirrors_about_half(batch):
    out = augment_batch(batch, (3, 0, 0), fill=FILL, flip=True)
    found = [_which_shift(s, o, flips=(False, True)) for s, o in zip(batch, out)]
    assert None not in found
    flipped = sum(f for _, _, f in found)
    assert 60 <= flipped <= 140, flipped                                # 200 fair draws
    plain = augment_batch(batch, (3, 0, 0), fill=FILL)                  # flip off: no image mirrored
    assert all(_which_shift(s, o) is not None for s, o in zip(batch, plain))


def test_zero_shift_is_identity_and_bad_shift_is_refused(batch):
    np.testing.assert_array_equal(augment_batch(batch, (0,), fill=FILL, max_shift=0), batch)
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(ValueError, match=r"max_shift must be a non-negative int, got max_shift="):
            augment_batch(batch, (0,), fill=FILL, max_shift=bad)


@pytest.mark.parametrize("model, expected", [("lenet5", True), ("resnet_mini", True), ("zhang2016", False),
                                             ("seed001", False)])
def test_model_defaults(model, expected):
    assert TrainConfig(model=model).resolved().augment is expected
    assert TrainConfig(model=model, augment=not expected).resolved().augment is (not expected)


def test_augment_must_be_a_bool():
    with pytest.raises(ValueError, match=r"augment must be True, False or None .* got augment=1"):
        TrainConfig(augment=1).resolved()


@pytest.fixture(scope="module")
def mnist():
    return gdata.load_dataset("mnist")


def _run(mnist, out, **kw):
    extra = {k: kw.pop(k) for k in ("resume", "stop_after") if k in kw}
    cfg = TrainConfig(**{**dict(model="seed002_c1", epochs=2, subset=256, test_subset=200, seed=3), **kw})
    return train(cfg if "resume" not in extra else None, data=mnist, device="cpu", out_dir=out,
                 progress=False, log=None, **extra)


def _same_weights(a, b):
    pa, pb = ck.load_checkpoint(a).params, ck.load_checkpoint(b).params
    return all(pa[k].tobytes() == pb[k].tobytes() for k in pa)


def test_trainer_applies_augmentation_reproducibly_and_resumes_bit_for_bit(mnist, tmp_path):
    on = _run(mnist, tmp_path / "on", augment=True)
    off = _run(mnist, tmp_path / "off", augment=False)
    assert not _same_weights(on.checkpoint, off.checkpoint)           # the shifted batches reach the step
    again = _run(mnist, tmp_path / "again", augment=True)
    assert _same_weights(on.checkpoint, again.checkpoint)
    _run(mnist, tmp_path / "part", augment=True, stop_after=1)
    train(None, data=mnist, device="cpu", resume=tmp_path / "part", progress=False, log=None)
    assert _same_weights(on.checkpoint, tmp_path / "part" / "checkpoint.npz")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("images_per_sec", "seconds", "train_seconds")}
                          for r in rows]
    assert strip(read_metrics(tmp_path / "part")) == strip(read_metrics(tmp_path / "on"))
