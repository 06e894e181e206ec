"""``--pretrained imagenet`` and torchvision's cache: only a failed download means offline (train
from scratch, saying so); a damaged cached file is a one-line error naming it. No network: the
download is replaced, or the cache already holds the file."""

from __future__ import annotations

import http.client
import logging
import urllib.error
from pathlib import Path

import pytest
import torch

from training.__main__ import main as cli_main
from training.models import ARCHS, build_model, cached_weights_path, load_pretrained_backbone

from .test_run_guards import tiny_argv, tiny_sample  # noqa: F401 (fixture)

WEIGHTS = ARCHS["resnet18"][1]


@pytest.fixture
def torch_home(tmp_path, monkeypatch) -> Path:
    """An empty TORCH_HOME whose downloads fail loudly if a test reaches them unexpectedly."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))

    def no_network(url, dst, *_args, **_kwargs):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return home


def _truncated_cache(home: Path) -> Path:
    cached = home / "hub" / "checkpoints" / Path(WEIGHTS.url).name
    cached.parent.mkdir(parents=True)
    buf = build_model("resnet18", 2).state_dict()
    torch.save({k: buf[k] for k in list(buf)[:4]}, cached)
    cached.write_bytes(cached.read_bytes()[:300])  # a download cut short, or a damaged disk
    return cached


def test_the_cache_path_is_torchvisions(torch_home):
    assert cached_weights_path(WEIGHTS) == torch_home / "hub/checkpoints/resnet18-f37072fd.pth"


def test_a_damaged_cached_file_is_an_error_naming_it_not_offline(torch_home):
    cached = _truncated_cache(torch_home)
    with pytest.raises(ValueError) as info:
        load_pretrained_backbone(build_model("resnet18", 3), "resnet18", "imagenet")
    message = str(info.value)
    assert str(cached) in message and "damaged" in message and "delete the file" in message
    assert "TORCH_HOME" in message and "\n" not in message


def test_a_damaged_cache_stops_the_cli(torch_home, tiny_sample, tmp_path, capsys):  # noqa: F811
    cached = _truncated_cache(torch_home)
    argv = tiny_argv(tiny_sample, tmp_path / "out")
    argv[argv.index("--pretrained") + 1] = "imagenet"
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --pretrained imagenet: ")
    assert f"cached ImageNet weights {cached}:" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "error",
    [
        urllib.error.URLError("[Errno -2] Name or service not known"),
        urllib.error.HTTPError(WEIGHTS.url, 503, "Service Unavailable", None, None),  # type: ignore
        http.client.IncompleteRead(b"partial", 1000),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError("timed out"),
    ],
)
def test_a_failed_download_trains_from_scratch_and_says_so(torch_home, monkeypatch, caplog, error):
    def offline(*_args, **_kwargs):
        raise error

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with caplog.at_level(logging.WARNING, logger="training.models"):
        source = load_pretrained_backbone(build_model("resnet18", 3), "resnet18", "imagenet")
    assert source == "none (ImageNet weights unavailable offline; from scratch)"
    assert any(
        "FROM SCRATCH" in r.getMessage() and type(error).__name__ in r.getMessage()
        for r in caplog.records
    )


@pytest.mark.parametrize(
    "error",
    [PermissionError(13, "Permission denied"), OSError(28, "No space left on device")],
    ids=["read-only", "disk-full"],
)
def test_a_cache_that_cannot_be_written_is_no_network_error(torch_home, monkeypatch, error):
    """Not "offline, from scratch": a ValueError (the CLI's one line) naming the cache file."""

    def unwritable(url, dst, *_args, **_kwargs):
        raise error

    monkeypatch.setattr(torch.hub, "download_url_to_file", unwritable)
    with pytest.raises(ValueError, match=r"cannot write ImageNet weights to .*resnet18") as info:
        load_pretrained_backbone(build_model("resnet18", 3), "resnet18", "imagenet")
    assert error.strerror in str(info.value) and "\n" not in str(info.value)


def test_a_good_cached_file_is_loaded_without_a_download(torch_home):
    cached = torch_home / "hub" / "checkpoints" / Path(WEIGHTS.url).name
    cached.parent.mkdir(parents=True)
    donor = build_model("resnet18", 1000)
    torch.save(donor.state_dict(), cached)
    model = build_model("resnet18", 3)
    assert load_pretrained_backbone(model, "resnet18", "imagenet") == f"torchvision:{WEIGHTS}"
    torch.testing.assert_close(model.conv1.weight, donor.conv1.weight)


def test_a_carstream_checkpoint_gives_its_ema_weights_the_shipped_model(tmp_path, caplog):
    """With --ema-decay, a checkpoint's ema_state_dict is what was scored and exported; its
    state_dict holds the raw weights. --pretrained takes the EMA's and says which it took."""
    raw, ema = build_model("resnet18", 5), build_model("resnet18", 5)
    path = tmp_path / "checkpoint.pt"
    torch.save({"state_dict": raw.state_dict(), "ema_state_dict": ema.state_dict()}, path)
    model = build_model("resnet18", 3)
    with caplog.at_level(logging.INFO, logger="training.models"):
        source = load_pretrained_backbone(model, "resnet18", str(path))
    assert source == f"file:{path} (ema_state_dict)"
    assert any(source in r.getMessage() for r in caplog.records)
    torch.testing.assert_close(model.conv1.weight, ema.conv1.weight)
    # without an EMA (null, as training writes it then) the checkpoint's state_dict
    torch.save({"state_dict": raw.state_dict(), "ema_state_dict": None}, path)
    assert load_pretrained_backbone(model, "resnet18", str(path)) == f"file:{path} (state_dict)"
    torch.testing.assert_close(model.conv1.weight, raw.conv1.weight)
    torch.save(raw.state_dict(), path)  # a plain state dict: no key to name
    assert load_pretrained_backbone(model, "resnet18", str(path)) == f"file:{path}"


def test_a_checkpoint_directory_gives_its_checkpoint_pt_recorded_as_that_file(tmp_path):
    """--pretrained RUN_DIR (a training run's --out, as --resume takes it) loads
    RUN_DIR/checkpoint.pt and records the same source as naming the file; a directory
    without one is refused saying it is a directory, not that it does not exist."""
    trained = build_model("resnet18", 5)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save(
        {"state_dict": trained.state_dict(), "ema_state_dict": None}, run_dir / "checkpoint.pt"
    )
    model = build_model("resnet18", 3)
    by_file = load_pretrained_backbone(model, "resnet18", str(run_dir / "checkpoint.pt"))
    model = build_model("resnet18", 3)
    assert load_pretrained_backbone(model, "resnet18", str(run_dir)) == by_file
    assert by_file == f"file:{run_dir / 'checkpoint.pt'} (state_dict)"
    torch.testing.assert_close(model.conv1.weight, trained.conv1.weight)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(IsADirectoryError) as info:
        load_pretrained_backbone(build_model("resnet18", 3), "resnet18", str(empty))
    assert f"{empty} is a directory" in str(info.value)
    assert "pass a weights file" in str(info.value)
