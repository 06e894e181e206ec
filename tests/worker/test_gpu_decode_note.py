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


def test_an_agreement_below_the_default_is_a_warning_even_when_its_gate_passed():
    # before: gate.passed true (a bundle built with --gpu-decode-agreement 0, or a CPU-pool
    # bundle whose gate did not apply) made a GPU worker log 0.5 as INFO
    zero = {
        **MEASURED,
        "top1_agreement": 0.5,
        "gate": {**MEASURED["gate"], "min_top1_agreement": 0.0},
    }
    text, sound = gpu_decode_note(parity(zero))
    assert not sound and "agreement 0.5 is below the default --gpu-decode-agreement 0.99" in text
    assert "--gpu-decode-agreement 0: recorded only" in text
    lower = {
        **MEASURED,
        "top1_agreement": 0.97,
        "gate": {**MEASURED["gate"], "min_top1_agreement": 0.95},
    }
    text, sound = gpu_decode_note(parity(lower))
    assert not sound and "0.97 is below the default" in text and "gate at build was 0.95" in text


def test_the_default_threshold_is_engine_builds_own(monkeypatch):
    from engine_build import decode_parity

    assert gpu_decode_note(parity({**MEASURED, "top1_agreement": 0.992}))[1]
    monkeypatch.setattr(decode_parity, "GPU_DECODE_AGREEMENT", 0.995)  # one place, not a copy
    text, sound = gpu_decode_note(parity({**MEASURED, "top1_agreement": 0.992}))
    assert not sound and "default --gpu-decode-agreement 0.995" in text


@pytest.mark.parametrize("gate", [{"min_top1_agreement": 0.0}, {"applied": False}])
def test_a_gate_that_was_0_or_not_applied_is_a_warning_whatever_the_agreement(gate):
    entry = {**MEASURED, "gate": {**MEASURED["gate"], **gate}}
    text, sound = gpu_decode_note(parity(entry))
    assert not sound and "0.996 meets the default --gpu-decode-agreement 0.99" in text
    assert ("CPU worker pools" in text) == ("applied" in gate)


def test_the_agreement_without_near_tie_flips_is_what_is_judged():
    entry = {
        **MEASURED,
        "top1_agreement": 0.98,
        "top1_agreement_excluding_near_ties": 0.996,
        "near_tie_flips": 1,
    }
    text, sound = gpu_decode_note(parity(entry))
    assert sound and "0.98" in text and "0.996 not counting 1 near-tie flips" in text
    text, sound = gpu_decode_note(parity({**entry, "top1_agreement_excluding_near_ties": 0.985}))
    assert not sound and "agreement 0.985 is below the default" in text


def test_a_cpu_fallback_on_a_gpu_build_is_quoted():
    entry = {**MEASURED, "device": "cpu", "fallback": "measured on cpu, not cuda: no nvJPEG"}
    text, sound = gpu_decode_note(parity(entry))
    assert sound and "measured on cpu, not cuda: no nvJPEG" in text
