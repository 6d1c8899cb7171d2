"""Batches built row by row (clip_pl/data/batch_rows.py, device_resize.CropCanvas) and the loader's crop RNG.

python -m pytest tests/data/test_batch_rows.py -q
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, IterableDataset

from clip_pl.data.batch_rows import StackedRows, batch_tensor
from clip_pl.data.batch_transform import crop_randomness, random_resized_box
from clip_pl.data.device_resize import CropCanvas


def test_stacked_rows_are_torch_stack_and_refuse_a_wrong_row():
    rows = [torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8) for _ in range(4)]
    stacked = StackedRows(4)
    for r in rows:
        stacked.add(r)
    assert torch.equal(stacked.result(), torch.stack(rows))
    short = StackedRows(4)
    short.add(rows[0])
    with pytest.raises(ValueError, match="one shape"):
        short.add(rows[0][:, :4])
    with pytest.raises(ValueError, match="got 1"):
        short.result()


class _SharedOrNot(IterableDataset):
    def __iter__(self):
        yield {"shared": batch_tensor((4, 8), torch.uint8).is_shared()}


def test_a_workers_batch_is_made_in_shared_memory():
    """In a worker the batch is allocated in shared memory (sending it then copies nothing); outside, not."""
    assert not batch_tensor((4, 8), torch.uint8).is_shared()
    assert batch_tensor((2, 3), torch.int64).shape == (2, 3)
    loader = DataLoader(_SharedOrNot(), batch_size=None, num_workers=1, multiprocessing_context="spawn")
    assert [bool(b["shared"]) for b in loader] == [True]


def _crops(sizes, seed=0):
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


@pytest.mark.parametrize("hint", [(0, 0), (32, 32), (64, 96), (200, 200)])
def test_crop_canvas_holds_every_crop_whatever_the_hint(hint):
    """Rows copied before the canvas grows keep their pixels; a hint far too large is not shipped."""
    sizes = [(20, 30), (50, 40), (33, 70), (10, 10), (64, 96)]
    crops = _crops(sizes)
    canvas = CropCanvas(len(crops), 32, hint)
    for c in crops:
        canvas.add(c)
    out = canvas.result()
    assert out["crop_size"].tolist() == [list(s) for s in sizes] and out["crop_out_size"] == 32
    pixels = out["crop"].numpy()
    assert pixels.shape[0] == len(crops) and pixels.shape[3] == 3
    assert pixels.shape[1] >= 64 and pixels.shape[2] >= 96
    assert pixels.shape[1] * pixels.shape[2] <= 96 * 96 / 0.75, "a hint much larger than the crops is cut back"
    for row, c in enumerate(crops):
        assert np.array_equal(pixels[row, : c.shape[0], : c.shape[1]], c), row
    assert canvas.next_hint() == (64, 96)


def test_crop_canvas_takes_tensor_crops_and_refuses_a_row_too_many():
    crops = _crops([(5, 6), (7, 3)])
    canvas = CropCanvas(2, 8)
    canvas.add(torch.from_numpy(crops[0]).permute(2, 0, 1))  # 3×h×w, as resized images are
    canvas.add(crops[1])
    with pytest.raises(ValueError, match="one more"):
        canvas.add(crops[1])
    assert np.array_equal(canvas.result()["crop"].numpy()[0, :5, :6], crops[0])


def test_crop_boxes_come_from_the_loaders_rng_and_leave_torchs_alone():
    """Inside crop_randomness the boxes are the given Random's (the same seed draws the same boxes), and
    torch's global RNG (the training process's own when num_workers=0) does not move."""
    state = torch.get_rng_state()

    def boxes(seed):
        with crop_randomness(random.Random(seed)):
            return [random_resized_box(240, 330, (0.08, 1.0), (3 / 4, 4 / 3)) for _ in range(50)]

    first = boxes(1)
    assert first == boxes(1) and first != boxes(2)
    assert torch.equal(state, torch.get_rng_state())
    torch.manual_seed(0)
    outside = random_resized_box(240, 330, (0.08, 1.0), (3 / 4, 4 / 3))
    torch.manual_seed(0)
    assert random_resized_box(240, 330, (0.08, 1.0), (3 / 4, 4 / 3)) == outside, "outside: torch's RNG"


def test_the_loader_in_the_training_process_leaves_torchs_rng_alone(tmp_path):
    from clip_pl.data import WebDatasetDataModule
    from clip_pl.data.device_resize import resize_batch
    from tests.support.fake_shards import write_shards

    def image(batch):  # the canvas around each crop is left uninitialised: compare the resized images
        return resize_batch(batch)["image"] if "crop" in batch else batch["image"]

    write_shards(str(tmp_path), [6, 6], image_px=(24, 40))

    def loader(resize_on):
        dm = WebDatasetDataModule(
            str(tmp_path), batch_size=4, num_workers=0, image_size=16, context_length=8, resize_on=resize_on
        )
        dm.setup("fit")
        return dm.train_dataloader()

    for resize_on in (None, "device"):
        batches = iter(loader(resize_on))  # the DataLoader itself draws a base seed here
        state = torch.get_rng_state()
        first = [image(b) for b in batches]
        assert torch.equal(state, torch.get_rng_state()), resize_on
        again = [image(b) for b in loader(resize_on)]
        assert len(first) == 3 and all(torch.equal(a, b) for a, b in zip(first, again)), "crops depend on the seed only"
