"""FLUX2_DEVICES and PREVIEW_REPLICAS (one engine replica per device), and admission against the replicas'
aggregate capacity: a bad device list is refused at start with the variable named, and a worker with two
replicas takes the sessions two engines carry."""

from __future__ import annotations

import pytest

from inference.admission import Admission
from inference.config import WorkerConfig, WorkerConfigError, load_worker_config
from inference.engines import flux2_options, replica_devices
from tests.inference.helpers import SECRET

EXACT_ON_AN_H200 = 1 / 14  # seconds per frame


def _config(**environ: str) -> WorkerConfig:
    return load_worker_config({"STREAM_SECRET": SECRET, **environ})


def test_flux2_devices_name_one_replica_each() -> None:
    config = _config(INFERENCE_ENGINE="flux2", FLUX2_DEVICES="cuda:0, cuda:1")
    assert replica_devices(config) == ("cuda:0", "cuda:1")
    assert flux2_options(config, "cuda:1")["device"] == "cuda:1"
    # Several CPU replicas are allowed (tests, the replicas bench on a CPU).
    assert replica_devices(_config(INFERENCE_ENGINE="flux2", FLUX2_DEVICES="cpu,cpu")) == ("cpu", "cpu")


def test_flux2_device_alone_is_still_one_replica_on_that_device() -> None:
    config = _config(INFERENCE_ENGINE="flux2", FLUX2_DEVICE="cpu")
    assert replica_devices(config) == ("cpu",)
    assert flux2_options(config)["device"] == "cpu"


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ("gpu0", "'gpu0' is not one"),
        ("cuda:0,,cuda:1", "'' is not one"),
        ("cuda:1,cuda:1", "lists a CUDA device twice"),
        ("cuda,cuda:0", "lists a CUDA device twice"),
    ],
)
def test_a_bad_device_list_is_refused_naming_the_variable(devices: str, message: str) -> None:
    with pytest.raises(WorkerConfigError, match="FLUX2_DEVICES") as raised:
        _config(INFERENCE_ENGINE="flux2", FLUX2_DEVICES=devices)
    assert message in str(raised.value)


def test_a_device_and_a_device_list_together_are_refused() -> None:
    with pytest.raises(WorkerConfigError, match="FLUX2_DEVICES or FLUX2_DEVICE, not both"):
        _config(INFERENCE_ENGINE="flux2", FLUX2_DEVICES="cuda:0,cuda:1", FLUX2_DEVICE="cuda:0")


def test_preview_replicas() -> None:
    assert replica_devices(_config()) == (None,)
    assert replica_devices(_config(PREVIEW_REPLICAS="3")) == (None, None, None)
    with pytest.raises(WorkerConfigError, match="PREVIEW_REPLICAS must be at least 1"):
        _config(PREVIEW_REPLICAS="0")
    with pytest.raises(WorkerConfigError, match="PREVIEW_REPLICAS"):
        _config(PREVIEW_REPLICAS="two")


def _measured(seconds: float, replicas: int, mode: str = "exact") -> Admission:
    admission = Admission(min_session_fps=12, replicas=replicas)
    for _ in range(5):
        admission.observe(mode, seconds)
    return admission


def test_admission_counts_the_replicas_together() -> None:
    one, two = _measured(EXACT_ON_AN_H200, 1), _measured(EXACT_ON_AN_H200, 2)
    assert not one.admits(["exact"], "exact")  # 7 FPS each on one GPU
    assert two.admits(["exact"], "exact")  # 14 FPS each on two
    assert not two.admits(["exact", "exact"], "exact")  # 9.3 FPS each
    assert (one.capacity("exact"), two.capacity("exact")) == (1, 2)
    assert two.session_fps(["exact"]) == pytest.approx(28.0)  # one viewer alone: both GPUs' frames


def test_admission_follows_the_replicas_that_are_ready() -> None:
    admission = _measured(EXACT_ON_AN_H200, 2)
    admission.replicas = 1  # one failed to load, or is still warming
    assert not admission.admits(["exact"], "exact")
    with pytest.raises(ValueError, match="at least one replica"):
        admission.replicas = 0
