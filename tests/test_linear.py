"""RowsLinear: the decoding engine's linear layer for few rows on the CPU."""

import json

import pytest
import torch
from torch import nn

from granite_speech_triton import bench_step
from granite_speech_triton.model.linear import MAX_ROWS, RowsLinear, padded_rows, use_rows_linears


def pair(bias: bool) -> tuple[nn.Linear, RowsLinear]:
    torch.manual_seed(0)
    plain = nn.Linear(48, 80, bias=bias)
    rows = RowsLinear(48, 80, bias=bias)
    rows.load_state_dict(plain.state_dict())
    return plain, rows


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(2, 48), (3, 48), (13, 48), (16, 1, 48), (MAX_ROWS, 48), (4, 3, 48)])
def test_few_rows_take_the_weight_first_product_and_agree_with_nn_linear(bias, shape):
    plain, rows = pair(bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        want, got = plain(x), rows(x)
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    flat = x.reshape(-1, 48)
    n = flat.shape[0]
    padded = torch.cat([flat, torch.zeros(padded_rows(n) - n, 48)])
    expected = (plain.weight @ padded.T)[:, :n].T.reshape(want.shape) + (plain.bias if bias else 0)
    assert torch.equal(got, expected)


def test_rows_are_padded_to_a_count_the_cpu_blas_multiplies_fast():
    assert [padded_rows(n) for n in (2, 3, 4, 5, 8, 9, 15, 16, 17, 63, 64)] == [4, 4, 4, 8, 8, 16, 16, 16, 24, 64, 64]


@pytest.mark.parametrize("shape", [(1, 48), (1, 1, 48), (MAX_ROWS + 1, 48), (300, 48), (0, 48)])
def test_one_row_and_long_inputs_are_nn_linear_bit_for_bit(shape):
    plain, rows = pair(bias=True)
    x = torch.randn(*shape)
    with torch.inference_mode():
        assert torch.equal(rows(x), plain(x))


def test_use_rows_linears_converts_plain_cpu_linears_only_and_keeps_the_weights():
    class Subclassed(nn.Linear):
        pass

    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Sequential(nn.Linear(8, 4)), Subclassed(4, 4))
    with torch.device("meta"):
        elsewhere = nn.Linear(8, 8)  # stands for a GPU's: left alone
    keys = dict(model.state_dict())
    assert use_rows_linears(model) is model
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
    assert all(s[form] > 0 for s in steps for form in bench_step.FORMS)
    assert steps[0]["max_logit_difference"] == 0.0  # one row: both forms are nn.Linear
    assert 0.0 <= steps[1]["max_logit_difference"] < 1e-4
