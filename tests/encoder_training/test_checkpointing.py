"""The training run's folder: where it is, what a resume must match, and one line for a damaged file."""

import pytest

from inversion.core.errors import UserError
from inversion.encoder_training import checkpointing


def test_the_run_folder_sits_beside_the_weights_file():
    assert checkpointing.folder("encoders/alexnet-tiny-imagenet-200.pt").as_posix() == "encoders/alexnet-tiny-imagenet-200"


def test_a_resume_must_match_the_settings_images_and_ranks(tmp_path):
    settings = {key: 1 for key in checkpointing.GUARDED}
    guard = {"settings": settings, "images": "abc", "world": 1}
    checkpointing.save(tmp_path, checkpointing.LAST, {"guard": guard, "history": [{}, {}]})
    last, partial = checkpointing.resume_point(tmp_path, guard, fresh=False)
    assert len(last["history"]) == 2 and partial is None
    for other, said in (({**guard, "images": "xyz"}, "images"), ({**guard, "world": 2}, r"ranks \(1 then, 2 now\)"),
                        ({**guard, "settings": {**settings, "seed": 4}}, "settings: seed 1 then, 4 now")):
        with pytest.raises(UserError, match=said):
            checkpointing.resume_point(tmp_path, other, fresh=False)
    checkpointing.save(tmp_path, checkpointing.IN_PROGRESS, {"guard": guard, "epoch": 5})
    assert checkpointing.resume_point(tmp_path, guard, fresh=False)[1] is None  # not the epoch after last.pt
    assert checkpointing.resume_point(tmp_path, guard, fresh=True) == (None, None)
    assert not (tmp_path / checkpointing.LAST).exists()
    (tmp_path / checkpointing.LAST).write_bytes(b"damaged")
    with pytest.raises(UserError, match=r"last\.pt cannot be read .*--fresh"):
        checkpointing.resume_point(tmp_path, guard, fresh=False)
