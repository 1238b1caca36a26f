"""What the callbacks read from the Trainer: the epochs done, under resumes and early ends."""

import pytest
import pytorch_lightning as pl
from pytorch_lightning.callbacks import Callback, ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_landscape.callbacks._trainer_state import epochs_done

from ._helpers import LIGHTNING_2_1, Classifier, make_trainer, random_classes


class _Epochs(Callback):
    """Records (hook, global step, epochs_done) where the monitors call it."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, int, float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        self.rows.append(("start", trainer.global_step, epochs_done(trainer, "start")))

    def on_train_batch_end(self, trainer, *args) -> None:
        self.rows.append(("batch", trainer.global_step, epochs_done(trainer, "batch")))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.rows.append(("epoch", trainer.global_step, epochs_done(trainer, "epoch_end")))

    def on_train_end(self, trainer, pl_module) -> None:
        self.rows.append(("end", trainer.global_step, epochs_done(trainer, "fit_end")))


@pytest.mark.skipif(
    LIGHTNING_2_1, reason="Lightning 2.1 resumed there into epoch 0 again (16 steps, not 15)"
)
def test_epochs_done_after_a_resume_at_an_epochs_last_batch(tmp_path):
    """A checkpoint saved at the last batch of epoch 0 (step 5 of 5): the resumed fit counts the
    epochs as the uninterrupted one does (Lightning's `started` count is one short there)."""
    loader = lambda: DataLoader(random_classes(), batch_size=8)  # noqa: E731 (5 batches)
    ckpt = ModelCheckpoint(tmp_path / "ck", every_n_train_steps=5, save_top_k=-1, filename="{step}")
    full = _Epochs()
    pl.seed_everything(0)
    trainer = make_trainer(tmp_path, [full, ckpt], max_epochs=3, enable_checkpointing=True)
    trainer.fit(Classifier(), loader())
    resumed = _Epochs()
    trainer = make_trainer(tmp_path, [resumed], max_epochs=3)
    trainer.fit(Classifier(), loader(), ckpt_path=tmp_path / "ck" / "step=5.ckpt")
    after = [row for row in full.rows if row[1] > 5 or row[0] == "end"]
    assert resumed.rows == [("start", 5, 1.0), *after], (resumed.rows, after)
    assert full.rows[0] == ("start", 0, 0.0) and ("batch", 5, 1.0) in full.rows
    assert after[-2:] == [("epoch", 15, 3.0), ("end", 15, 3.0)] and ("batch", 6, 1.2) in after


def test_epochs_done_when_max_steps_ends_the_fit_mid_epoch(tmp_path):
    spy = _Epochs()
    make_trainer(tmp_path, [spy], max_epochs=3, max_steps=7).fit(
        Classifier(), DataLoader(random_classes(), batch_size=8)
    )
    assert spy.rows[-3:] == [("batch", 7, 1.4), ("epoch", 7, 1.4), ("end", 7, 1.4)]
