"""Run directories are data, never code: checkpoints and config.json are checked, not trusted."""

import json
import os
import re
from pathlib import Path

import pytest
import torch

from inference.commands.cli import main
from inference.runs import RunError, TrainConfig, read_config

TINY = ["--hidden", "8", "--z-dim", "2", "--epochs", "1", "--batch-size", "512",
        "--num-particles", "2", "--no-progress"]  # fmt: skip


class _Payload:
    """What a hostile checkpoint holds: unpickling it would create ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def _poison(run: Path, marker: Path) -> None:
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["extra"] = _Payload(marker)
    torch.save(state, run / "checkpoint.pt")


def test_no_command_executes_code_from_a_checkpoint(tmp_path, capsys):
    run, rbm = tmp_path / "vae", tmp_path / "rbm"
    assert main(["train", "--out", str(run), *TINY]) == 0
    assert main(["evaluate", str(run), "--k", "1,5", "--no-progress"]) == 0
    assert main(["rbm", "train", "--hidden", "4", "--epochs", "1", "--out", str(rbm),
                 "--no-progress"]) == 0  # fmt: skip
    marker = tmp_path / "pwned"
    _poison(run, marker)
    _poison(rbm, marker)
    commands = [
        ["evaluate", str(run), "--no-progress"],
        ["gaps", str(run), "--k", "5", "--no-progress"],
        ["diagnose", str(run), "--points", "1", "--no-progress"],
        ["compare", str(run), "--out", str(tmp_path / "cmp")],
        ["train", "--out", str(run), "--resume", *TINY, "--epochs", "2"],
        ["rbm", "evaluate", str(rbm)],
        ["rbm", "train", "--hidden", "4", "--epochs", "2", "--out", str(rbm), "--resume",
         "--no-progress"],
    ]  # fmt: skip
    capsys.readouterr()
    for args in commands:
        assert main(args) == 1, args
        err = capsys.readouterr().err
        assert err.startswith("elbolab: error: refusing to load") and err.count("\n") == 1, err
        assert "pickled objects" in err
        assert not marker.exists(), args


def test_config_json_is_validated_like_the_command_line(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), *TINY]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["kind"] == "svi" and saved["elbolab"]  # marked as elbolab's, with its version
    cases = {
        "hidden": ("many", "'hidden' must be list[int] or None"),
        "lr": ("0.1", "'lr' must be float"),
        "epochs": (True, "'epochs' must be int"),
        "num_particles": (0, "--num-particles must be >= 1"),
        "model": ("gpt", "--model 'gpt' is not one of"),
        "activation": ("swish?", "--activation 'swish?' is not one of"),
        "data_path": (3, "'data_path' must be str or None"),
        "colour": ("blue", "unknown configuration keys: colour"),
    }
    for key, (value, message) in cases.items():
        (run / "config.json").write_text(json.dumps({**saved, key: value}))
        with pytest.raises(RunError, match=re.escape(message)):
            read_config(run)
        assert main(["evaluate", str(run), "--no-progress"]) == 1
    for text in ("[1, 2]", "null", '"svi"', "[" * 5000 + "]" * 5000):
        (run / "config.json").write_text(text)
        with pytest.raises(RunError, match="config.json"):
            read_config(run)
    (run / "config.json").write_text(json.dumps({**saved, "lr": 1}))  # an int where a float goes
    assert read_config(run).lr == 1.0 and isinstance(read_config(run).lr, float)


def test_config_round_trip_keeps_every_field(tmp_path):
    config = TrainConfig(model="hvae", layers=3, hidden=[8, 8], z_dim=2, corruption=None)
    again = TrainConfig.from_dict(json.loads(json.dumps(config.to_dict())))
    assert again == config
