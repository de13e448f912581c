"""RowsLinear, KernelRowsLinear and the rows kernel: the decoding engine's few-row products on the CPU."""

import json
import platform

import pytest
import torch
from torch import nn

from granite_speech_triton import bench_step
from granite_speech_triton.model import rows_kernel
from granite_speech_triton.model.decoder import load_ar_decoder
from granite_speech_triton.model.linear import (
    KERNEL_MAX_ROWS,
    MAX_ROWS,
    KernelRowsLinear,
    RowsLinear,
    padded_rows,
    use_rows_linears,
)

KERNEL_HOST = platform.machine() == "x86_64" and rows_kernel.compiler() is not None


def pair(bias: bool) -> tuple[nn.Linear, RowsLinear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias)
    rows = RowsLinear(48, 80, bias=bias)
    rows.load_state_dict(plain.state_dict())
    return plain, rows


def test_rows_are_padded_to_a_count_the_cpu_blas_multiplies_fast():
    assert [padded_rows(n) for n in (2, 3, 4, 5, 8, 9, 15, 16, 17, 63, 64)] == [4, 4, 4, 8, 8, 16, 16, 16, 24, 64, 64]


@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (MAX_ROWS + 1, 48), (300, 48), (0, 48)])
def test_one_row_and_long_inputs_are_nn_linear_bit_for_bit(shape):
    plain, rows = pair(bias=True)
    x = torch.randn(*shape)
    with torch.inference_mode():
        assert torch.equal(rows(x), plain(x))


def test_the_kernel_runs_on_an_x86_host_with_a_compiler():
    # This project's machines (CI included) have one; elsewhere the engine keeps oneMKL.
    assert (rows_kernel.library() is not None) == KERNEL_HOST


needs_kernel = pytest.mark.skipif(not KERNEL_HOST, reason="the rows kernel needs x86-64 and a C compiler")


def weight_first(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """RowsLinear's product: W @ x^T over the rows padded to `padded_rows`."""
    padded = torch.cat([rows, torch.zeros(padded_rows(len(rows)) - len(rows), rows.shape[1])])
    return (weight @ padded.T)[:, : len(rows)].T


def kernel_product(weight: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """KernelRowsLinear's product: the rows kernel over the rows padded to a multiple of four."""
    padded = torch.cat([rows, torch.zeros(-len(rows) % 4, rows.shape[1])])
    return rows_kernel.rows_matmul(padded, weight)[: len(rows)]


ROWS_SHAPES = [(2, 48), (3, 48), (13, 48), (16, 1, 48), (MAX_ROWS, 48), (4, 3, 48)]
KERNEL_SHAPES = [(1, 48), (2, 48), (5, 48), (13, 1, 48), (KERNEL_MAX_ROWS, 48), (4, 3, 48)]
FEW_ROW_CASES = [(RowsLinear, weight_first, shape) for shape in ROWS_SHAPES] + [
    pytest.param(KernelRowsLinear, kernel_product, shape, marks=needs_kernel) for shape in KERNEL_SHAPES
]


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize(("form", "product", "shape"), FEW_ROW_CASES)
def test_few_rows_take_the_form_s_own_product_and_agree_with_nn_linear(bias, form, product, shape):
    plain = nn.Linear(48, 80, bias=bias)
    layer = form(48, 80, bias=bias)
    layer.load_state_dict(plain.state_dict())
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = plain(x), layer(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    expected = product(plain.weight.detach(), x.reshape(-1, 48)) + (plain.bias.detach() if bias else 0)
    assert torch.equal(got, expected.reshape(want.shape)), "the form's padded product, bit for bit"


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
@pytest.mark.parametrize(("rows", "k", "n"), [(4, 8, 1), (4, 16, 2), (8, 64, 3), (12, 48, 80), (24, 256, 301)])
def test_the_kernel_computes_the_product(threads, rows, k, n):
    x, weight = torch.randn(rows, k), torch.randn(n, k)
    got = rows_kernel.rows_matmul(x, weight, threads)
    assert got.shape == (rows, n) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), x.double() @ weight.double().T, rtol=0, atol=1e-5 * k**0.5)


@needs_kernel
@pytest.mark.parametrize(
    ("x", "weight"),
    [
        (torch.randn(3, 16), torch.randn(5, 16)),  # rows not a multiple of 4
        (torch.randn(4, 12), torch.randn(5, 12)),  # inner dimension not a multiple of 8
        (torch.randn(4, 16).double(), torch.randn(5, 16).double()),
        (torch.randn(16, 4).T, torch.randn(5, 16)),  # not contiguous
    ],
)
def test_the_kernel_refuses_what_it_does_not_take(x, weight):
    assert not rows_kernel.fits(x, weight)
    with pytest.raises(ValueError, match="rows kernel"):
        rows_kernel.rows_matmul(x, weight)


@pytest.mark.parametrize("cc", ["/nonexistent/cc", "false"])
def test_without_a_working_compiler_there_is_no_kernel_and_the_engine_keeps_onemkl(monkeypatch, tmp_path, cc):
    monkeypatch.setenv("CC", cc)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))  # nothing built there yet
    monkeypatch.setattr(rows_kernel, "library", rows_kernel.library.__wrapped__)
    assert rows_kernel.library() is None
    assert type(use_rows_linears(nn.Sequential(nn.Linear(8, 8)))[0]) is RowsLinear


@needs_kernel
def test_the_library_is_built_once_per_source(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cc = rows_kernel.compiler()
    first = rows_kernel.build(cc)
    stamp = first.stat().st_mtime_ns
    assert rows_kernel.build(cc) == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in (tmp_path / "granite-speech-triton").iterdir()] == [first.name]


@needs_kernel
@pytest.mark.parametrize(("in_features", "shape"), [(48, (KERNEL_MAX_ROWS + 1, 48)), (48, (0, 48)), (50, (3, 50))])
def test_kernel_rows_linear_leaves_the_rest_to_rows_linear(in_features, shape):
    rows = RowsLinear(in_features, 80)
    kernel = KernelRowsLinear(in_features, 80)
    kernel.load_state_dict(rows.state_dict())
    x = torch.randn(*shape)
    with torch.inference_mode():
        assert torch.equal(kernel(x), rows(x))


def test_use_rows_linears_converts_plain_cpu_linears_only_and_keeps_the_weights():
    class Subclassed(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), Subclassed(4, 4))
    with torch.device("meta"):
        elsewhere = nn.Linear(8, 8)  # stands for a GPU's: left alone
    keys = dict(model.state_dict())
    assert use_rows_linears(model, kernel=False) is model
    assert [type(m) for m in model.modules() if isinstance(m, nn.Linear)] == [RowsLinear, RowsLinear, Subclassed]
    assert model.state_dict().keys() == keys.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in keys.items())
    assert type(use_rows_linears(elsewhere)) is nn.Linear


def test_bench_step_times_both_forms_and_their_logits_agree(tiny_ar_checkpoint, tmp_path):
    out = tmp_path / "step.json"
    argv = ["--ar-checkpoint", str(tiny_ar_checkpoint), "--rows", "1,3", "--prompt", "12", "--repeats", "1"]
    assert bench_step.main([*argv, "--out", str(out)]) == 0
    steps = json.loads(out.read_text())["steps"]
    assert [s["rows"] for s in steps] == [1, 3]
    forms = list(bench_step.forms_here())
    assert len(forms) == (3 if KERNEL_HOST else 2)
    assert all(s[form] > 0 for s in steps for form in forms)
    onemkl, *kernel = forms[1:]
    assert steps[0]["max_logit_difference"][onemkl] == 0.0  # one row: RowsLinear is nn.Linear
    assert all(0.0 <= diff < 1e-4 for s in steps for diff in s["max_logit_difference"].values())
    assert all(s["max_logit_difference"][name] > 0.0 for s in steps for name in kernel)


@pytest.mark.parametrize("kernel", [True, False])
def test_the_decoder_multiplies_with_the_kernel_unless_told_not_to(tiny_ar_checkpoint, kernel):
    llm = load_ar_decoder(tiny_ar_checkpoint, rows_kernel=kernel).engine.runner.llm
    expected = KernelRowsLinear if kernel and KERNEL_HOST else RowsLinear
    assert {type(m) for m in llm.modules() if isinstance(m, nn.Linear)} == {expected}
