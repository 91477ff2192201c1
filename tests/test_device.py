"""What benchmarks call this machine's CPU: the model name and its widest vector extensions."""

from __future__ import annotations

import pytest

from i2e_deploy import device

EPYC_AVX2 = "model name\t: AMD EPYC\nflags\t\t: fpu sse sse2 fma avx f16c avx2\n"
XEON_AMX = (
    "model name\t: Intel(R) Xeon(R) Platinum 8480+\nflags\t\t: avx2 avx512f avx512_vnni "
    "avx512_bf16 amx_bf16 amx_int8 amx_tile\n"
)


@pytest.mark.parametrize(
    "cpuinfo, name",
    [
        (EPYC_AVX2, "AMD EPYC (AVX2)"),
        (
            XEON_AMX,
            "Intel(R) Xeon(R) Platinum 8480+ (AMX-INT8, AMX-BF16, AVX512-BF16, AVX512-VNNI, "
            "AVX-512)",
        ),
        ("model name\t: Some CPU\n", "Some CPU"),
    ],
)
def test_cpu_name_names_the_vector_extensions(monkeypatch, cpuinfo, name):
    monkeypatch.setattr(device, "_cpuinfo", lambda: cpuinfo)
    assert device.cpu_name() == name
