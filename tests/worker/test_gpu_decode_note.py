"""What a GPU worker with gpu_decode logs at start about parity.json's ``decode.gpu_decode``."""

from __future__ import annotations

import pytest

from worker.run import gpu_decode_note

MEASURED = {
    "device": "cuda",
    "n_images": 240,
    "top1_agreement": 0.996,
    "accuracy_cost": 0.004,
    "max_abs_pixel_diff": 3.0,
    "non_finite_logits": 0,
    "gate": {"min_top1_agreement": 0.99, "passed": True, "measured": True, "failures": []},
}


def parity(entry: dict) -> dict:
    return {"artifacts": {}, "decode": {"gpu_decode": entry}}


def test_a_gpu_measured_entry_is_logged_as_info_with_its_numbers():
    text, sound = gpu_decode_note(parity(MEASURED))
    assert sound and text.startswith("gpu_decode: ") and text.endswith("(parity.json)")
    for part in ("0.996", "accuracy cost 0.004", "3.0 grey levels", "240 baseline JPEG", "cuda"):
        assert part in text
    assert "libjpeg" not in text  # measured by nvJPEG itself: nothing to qualify


def test_a_cpu_measured_entry_says_nvjpeg_differs():
    text, sound = gpu_decode_note(parity({**MEASURED, "device": "cpu"}))
    assert sound and "measured on cpu" in text
    assert "libjpeg-turbo" in text and "nvJPEG" in text and "estimate" in text


@pytest.mark.parametrize(
    "report",
    [
        None,  # no parity.json
        {"artifacts": {}},  # built before engine_build measured the GPU-decode path
        {"artifacts": {}, "decode": {}},
        {"artifacts": {}, "decode": ["gpu_decode"]},  # a hand-edited report: no crash
        {"artifacts": {}, "decode": {"gpu_decode": 0.99}},
    ],
)
def test_a_bundle_without_the_entry_is_a_warning(report):
    text, sound = gpu_decode_note(report)
    assert not sound and "no entry for the GPU-decode path" in text and "rebuild" in text


def test_an_entry_that_measured_nothing_is_a_warning_quoting_why():
    skipped = {"device": "cuda", "n_images": 0, "top1_agreement": None, "skipped": "no nvJPEG"}
    text, sound = gpu_decode_note(parity(skipped))
    assert not sound and "did not measure" in text and "no nvJPEG" in text
    none = {"device": "cpu", "n_images": 0, "top1_agreement": None, "note": "no baseline JPEG"}
    text, sound = gpu_decode_note(parity(none))
    assert not sound and "no baseline JPEG" in text


def test_a_failed_gate_or_non_finite_logits_is_a_warning():
    failed = {**MEASURED, "top1_agreement": 0.9, "gate": {**MEASURED["gate"], "passed": False}}
    text, sound = gpu_decode_note(parity(failed))
    assert not sound and "0.9" in text
    text, sound = gpu_decode_note(parity({**MEASURED, "non_finite_logits": 2}))
    assert not sound and "2 non-finite logits" in text
