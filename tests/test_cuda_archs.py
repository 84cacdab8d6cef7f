"""The CUDA architecture choice of cpp_ext/build.py (cpp_ext/cuda_archs.py): parsing of
APTP_CUDA_ARCHS, the default's Jetson entries, filtering by what nvcc lists, the PTX target.
No nvcc needed: nvcc's ``--list-gpu-arch`` output is given as text."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "cpp_ext" / "cuda_archs.py"
_spec = importlib.util.spec_from_file_location("cuda_archs_under_test", _PATH)
archs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(archs)

# What `nvcc --list-gpu-arch` prints, one compute_XX per line (CUDA 12.6 is JetPack 6's; CUDA 13
# no longer lists anything below 7.5 and renamed Thor to 110).
NVCC_12_6 = "\n".join(f"compute_{a}" for a in (50, 52, 53, 60, 61, 62, 70, 72, 75, 80, 86, 87, 89, 90))
NVCC_13_0 = "\n".join(f"compute_{a}" for a in (75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121))


def test_default_covers_orin_and_xavier_with_cuda_12_6():
    chosen, left_out = archs.choose_archs(None, archs.supported_archs(NVCC_12_6))
    assert "87" in chosen and "72" in chosen
    assert chosen == ["72", "75", "80", "86", "87", "89", "90"]
    assert left_out == ["100", "110", "120"]


def test_cuda_13_keeps_orin_and_says_why_xavier_is_left_out():
    chosen, left_out = archs.choose_archs("", archs.supported_archs(NVCC_13_0))
    assert "87" in chosen and "72" not in chosen and "110" in chosen
    assert left_out == ["72"]
    line = archs.describe(chosen, left_out, explicit=False)
    assert "sm_87" in line and "left out" in line and "sm_72" in line and "below 7.5" in line
    assert line.split(":")[1].split("+")[0].split() == [f"sm_{a}" for a in chosen]


@pytest.mark.parametrize("text, want", [
    ("87", ["87"]),
    ("87;72", ["72", "87"]),
    ("8.7, 7.2", ["72", "87"]),
    ("sm_87 compute_90 90", ["87", "90"]),
    (" 120 ; 80 ;", ["80", "120"]),
])
def test_env_value_is_parsed(text, want):
    assert archs.parse_archs(text) == want
    assert archs.choose_archs(text, None) == (want, [])


@pytest.mark.parametrize("text, message", [("orin", "'orin'"), ("8.7.1", "'8.7.1'"), ("1000", "'1000'"),
                                           (" ; ", "names no architecture")])
def test_bad_env_value_names_the_entry(text, message):
    with pytest.raises(ValueError, match=message):
        archs.parse_archs(text)


def test_explicit_choice_is_kept_even_if_nvcc_does_not_list_it():
    chosen, left_out = archs.choose_archs("72;87", archs.supported_archs(NVCC_13_0))
    assert chosen == ["72", "87"] and left_out == ["72"]
    assert "expect it to fail" in archs.describe(chosen, left_out, explicit=True)


def test_gencode_has_a_cubin_each_and_ptx_of_the_newest():
    flags = archs.gencode_flags(["87", "100", "90"])
    assert flags[:3] == ["-gencode=arch=compute_87,code=sm_87", "-gencode=arch=compute_100,code=sm_100",
                         "-gencode=arch=compute_90,code=sm_90"]
    assert flags[3] == "-gencode=arch=compute_100,code=compute_100"


def test_unknown_nvcc_support_falls_back_to_a_safe_list():
    chosen, left_out = archs.choose_archs(None, None)
    assert chosen == list(archs.FALLBACK_ARCHS) and "87" in chosen and left_out == []
    assert archs.supported_archs("nvcc fatal : Unknown option") == set()
