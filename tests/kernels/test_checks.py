"""kernels/checks.py: the argument checks every kernel entry point shares."""
import pytest
import torch
import torch.nn.functional as F

from sparse_compile.kernels import checks


def test_pair():
    assert checks.pair(3) == (3, 3) and checks.pair([1, 2]) == (1, 2)
    with pytest.raises(ValueError, match="my_op: stride must be an int or a pair"):
        checks.pair((1, 2, 3), "stride", "my_op")


@pytest.mark.parametrize("ks,st,pd,dl", [(3, 1, 1, 1), ((3, 1), (2, 1), (0, 2), (1, 3)), (5, 3, 2, 2)])
def test_conv_out_hw_is_torch_conv2d_output_size(ks, st, pd, dl):
    x = torch.randn(1, 2, 11, 13)
    w = torch.randn(4, 2, *checks.pair(ks))
    y = F.conv2d(x, w, None, st, pd, dl)
    args = [checks.pair(v) for v in (ks, st, pd, dl)]
    assert checks.conv_out_hw(11, 13, *args) == tuple(y.shape[2:])
    assert checks.check_conv_geometry(x, ks, st, pd, dl)[4] == tuple(y.shape[2:])


def test_fan_in_limit_names_linear_or_conv_fan_in():
    v, i = torch.randn(4, 5), torch.zeros(4, 5, dtype=torch.int16)
    with pytest.raises(ValueError, match="exceeds x's fan-in 3"):
        checks.check_linear_args(torch.randn(2, 3), v, i, None)
    with pytest.raises(ValueError, match=r"exceeds the fan-in C\*kh\*kw = 4"):
        checks.check_linear_args(torch.randn(1, 4, 8, 8), v, i, None, fan_in=4)
    checks.check_linear_args(torch.randn(1, 4, 8, 8), v, i, None, fan_in=36)  # a 3x3 conv: fine
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        checks.check_conv_geometry("x", 3, 1, 0, 1)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
def test_csr_mm_lives_with_the_op_schemas():
    from sparse_compile.compiler import modules
    from sparse_compile.kernels import ops

    assert modules.csr_mm is ops.csr_mm
    w = torch.tensor([[0.0, 2.0, 0.0], [1.0, 0.0, 3.0]]).to_sparse_csr()
    x = torch.randn(3, 4)
    y = torch.ops.sparse_compile.csr_mm(w.crow_indices(), w.col_indices(), w.values(), 3, x)
    torch.testing.assert_close(y, w.to_dense() @ x)
