# The compiled stage-5 update's matrix products on a CPU, each run by the faster of two kernels: oneDNN's or ATen's
# default (MKL's sgemm). On the AMD EPYC of docs/speed.md, one thread, MKL multiplies 256x256 by 256x256 in fp32 at
# about 105 GFLOP/s and oneDNN at about 220, the rate at which JAX's XLA runs the same product; MKL is also slow on a
# product into a few columns (256x256 by 256x11: 85 us, against 23 us for the same numbers as 11x256 by 256x256). The
# 2x256 MLPs spend four fifths of a compiled step in these products. The swap is a pass over the graph that inductor
# compiles, after the gradients have been derived (AOTAutograd): the forward and backward products stay the same
# products, only the kernel that computes them changes, so the numbers are the same to float rounding (the order of
# the sums inside a product). Eager code (--no-compile) is untouched. docs: docs/speed.md
import math

import torch
import torch.utils.flop_counter
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MIN_INNER = 16  # oneDNN for an inner dimension of at least this; below it ATen's kernel is as fast (measured)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it, stored by rows or by columns. oneDNN is slow on other strides: on a column slice of the batch
    rows (the states, 11 of each row's 27 numbers) a product of 1.4 MFLOP took 15 ms."""
    (rows, cols), (s_rows, s_cols) = t.shape, t.stride()
    return t if (s_cols == 1 and s_rows == cols) or (s_rows == 1 and s_cols == rows) else t.contiguous()


def _product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [m, k] and b [k, n], by the faster kernel (measured, one thread): ATen's for a vector (gemv, an outer
    product) or a thin inner dimension, oneDNN's for the rest."""
    (m, k), n = a.shape, b.shape[1]
    if n < m:  # both kernels are faster with the smaller of m and n as the rows: (b^T a^T)^T
        return _product(b.t(), a.t()).t().contiguous()  # a copy of at most [256, 15] numbers
    if min(m, k, n) < MIN_INNER:
        return a @ b
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(b).t(), None, "none", [], "")  # x @ w^T, w = b^T


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b: a [m, k] and b [k, n], or batches of them ([E, m, k] and [E, k, n]), one _product per member."""
    return _product(a, b) if a.dim() == 2 else torch.stack([_product(x, y) for x, y in zip(a, b)])


def _matmul_meta(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """matmul's result without computing it, for the compiler: its shape (it is contiguous)."""
    return a.new_empty(*a.shape[:-1], b.shape[-1])


@torch.utils.flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """oneDNN's x @ w^T, for --bench's FLOP count (torch.utils.flop_counter knows only ATen's products)."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


_library = torch.library.Library("v2a", "DEF")  # an operator of the compiled graph: torch.ops.v2a.matmul
_library.define("matmul(Tensor a, Tensor b) -> Tensor")
_library.impl("matmul", matmul, "CPU")
_library.impl("matmul", _matmul_meta, "Meta")


class CpuMatmuls(CustomGraphPass):
    """Inductor's post-grad pass (torch.compile option post_grad_custom_post_pass): every fp32 mm, bmm, addmm and
    baddbmm on the CPU becomes torch.ops.v2a.matmul, plus the bias for addmm and baddbmm (a sum that inductor fuses
    into the elementwise kernel after it, e.g. the ReLU)."""

    PRODUCTS = {aten.mm.default: False, aten.bmm.default: False, aten.addmm.default: True, aten.baddbmm.default: True}

    def __call__(self, graph: torch.fx.Graph):
        for node in list(graph.nodes):
            with_bias = self.PRODUCTS.get(node.target) if node.op == "call_function" else None
            if with_bias is None or node.kwargs:  # not a product, or one with beta or alpha
                continue
            bias, a, b = node.args if with_bias else (None, *node.args)
            if not _rewritable(a.meta["val"], b.meta["val"]):
                continue
            with graph.inserting_before(node):
                product = graph.call_function(torch.ops.v2a.matmul.default, (a, b))
                product.meta["val"] = _matmul_meta(a.meta["val"], b.meta["val"])
                if with_bias:
                    product = graph.call_function(aten.add.Tensor, (product, bias))
                    product.meta["val"] = node.meta["val"]
            node.replace_all_uses_with(product)
            graph.erase_node(node)

    def uuid(self) -> bytes:  # inductor's cache key for the pass: this file's text
        return get_hash_for_files((__file__,))


def _rewritable(a, b) -> bool:
    """Whether a product of a and b is one that CpuMatmuls and SameProducts hand to matmul: fp32 on a CPU."""
    return a.device.type == "cpu" and a.dtype == b.dtype == torch.float32


class SameProducts(TorchDispatchMode):
    """The eager twin of CpuMatmuls, for --no-compile: inside `with SameProducts():` every fp32 product on a CPU,
    forward and backward, is computed by matmul as the compiled update computes it. Without it, compiled and eager
    runs drift apart: a different kernel rounds a product differently, and Adam's first steps turn a rounding-level
    gradient (an input feature whose gradient nearly cancels over the batch) into a step of +-lr."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        with_bias = CpuMatmuls.PRODUCTS.get(func)
        if with_bias is None or kwargs:  # not a product, or one with beta or alpha
            return func(*args, **(kwargs or {}))
        bias, a, b = args if with_bias else (None, *args)
        if not _rewritable(a, b):
            return func(*args)
        return matmul(a, b) + bias if with_bias else matmul(a, b)


def same_products(fn):
    """fn, run inside SameProducts."""
    def call(*args, **kwargs):
        with SameProducts():
            return fn(*args, **kwargs)
    return call
