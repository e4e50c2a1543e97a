# Stage 5's matrix products on a CPU, each run by the faster of two kernels: oneDNN's or ATen's default (MKL's sgemm).
# On the AMD EPYC of docs/speed.md, one thread, MKL multiplies 256x256 by 256x256 in fp32 at about 105 GFLOP/s and
# oneDNN at about 220, the rate at which JAX's XLA runs the same product; MKL is also slow on a product into a few
# columns (256x256 by 256x11: 85 us, against 23 us for the same numbers computed as 11x256 by 256x256). The 2x256 MLPs
# spend four fifths of a stage-5 step in these products.
# - Compiled: CpuMatmuls, a pass over the graph that inductor compiles, after the gradients have been derived
#   (AOTAutograd): the forward and backward products stay the same products, only the kernel that computes each changes.
# - Eager (--no-compile): SameProducts hands the same products to the same kernels, forward and backward.
# Both plan a product with product(), so compiled and eager runs compute the same numbers (tests/test_v2a.py), and
# these are the plain products' to float rounding (the order of the sums inside a product). docs: docs/speed.md
import math
from types import SimpleNamespace

import torch
import torch.utils.flop_counter
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten
MIN_DIM = 16  # oneDNN for a product whose three dimensions are all at least this; below, ATen's is as fast (measured)


def product(a, b, shape_a: tuple, shape_b: tuple, ops):
    """a @ b for a [m, k] and b [k, n], planned by shape (measured on one thread): with the smaller of m and n as the
    rows, (b^T a^T)^T where n < m, which both kernels run faster; then ATen's kernel for a vector product (gemv, an
    outer product) or any dimension under MIN_DIM, oneDNN's for the rest. `ops` (EAGER or the pass's) supplies t, mm
    and onednn for tensors or for graph nodes."""
    (m, k), n = shape_a, shape_b[1]
    if n < m:
        return ops.t(product(ops.t(b), ops.t(a), (n, k), (k, m), ops))
    return ops.mm(a, b) if min(m, k, n) < MIN_DIM else ops.onednn(a, b)


def _dense(t: torch.Tensor) -> torch.Tensor:
    """t, or a copy of it, stored by rows or by columns. oneDNN is slow on other strides: on a column slice of the batch
    rows (the states, 11 of each row's 27 numbers) a product of 1.4 MFLOP took 15 ms."""
    (rows, cols), (s_rows, s_cols) = t.shape, t.stride()
    return t if (s_cols == 1 and s_rows == cols) or (s_rows == 1 and s_cols == rows) else t.contiguous()


def onednn_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b by oneDNN (its linear layer computes x @ w^T; here w = b^T)."""
    return torch.ops.mkldnn._linear_pointwise(_dense(a), _dense(b).t(), None, "none", [], "")


@torch.utils.flop_counter.register_flop_formula(torch.ops.mkldnn._linear_pointwise)
def _linear_flops(x_shape, w_shape, *args, **kwargs) -> int:
    """oneDNN's x @ w^T, for --bench's FLOP count (torch.utils.flop_counter knows only ATen's products)."""
    return 2 * math.prod(x_shape[:-1]) * x_shape[-1] * w_shape[0]


_library = torch.library.Library("v2a", "DEF")  # onednn_mm as an operator of the compiled graph: torch.ops.v2a.onednn_mm
_library.define("onednn_mm(Tensor a, Tensor b) -> Tensor")
_library.impl("onednn_mm", onednn_mm, "CPU")
_library.impl("onednn_mm", lambda a, b: a.new_empty(a.shape[0], b.shape[1]), "Meta")  # its result's shape, for the compiler

EAGER = SimpleNamespace(t=torch.t, mm=torch.mm, onednn=onednn_mm)
PRODUCTS = {aten.mm.default: False, aten.bmm.default: False, aten.addmm.default: True, aten.baddbmm.default: True}


def _operands(func, args, kwargs, val=lambda x: x):
    """(bias or None, a, b) of a product that the two rewrites take: mm, bmm, addmm or baddbmm without beta and alpha,
    fp32 on a CPU; None for anything else. `val` gives an argument's tensor (a graph node's is its meta["val"])."""
    with_bias = PRODUCTS.get(func)
    if with_bias is None or kwargs:
        return None
    bias, a, b = args if with_bias else (None, *args)
    ta, tb = val(a), val(b)
    return (bias, a, b) if ta.device.type == "cpu" and ta.dtype == tb.dtype == torch.float32 else None


class SameProducts(TorchDispatchMode):
    """--no-compile's twin of CpuMatmuls: inside `with SameProducts():` every product that CpuMatmuls rewrites is
    computed as the compiled update computes it. Without it compiled and eager runs drift apart: a different kernel
    rounds a product differently, and Adam's first steps turn a gradient at rounding level (an input whose gradient
    nearly cancels over the batch) into a step of +-lr."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if (operands := _operands(func, args, kwargs)) is None:
            return func(*args, **(kwargs or {}))
        bias, a, b = operands
        if a.dim() == 2:
            out = product(a, b, a.shape, b.shape, EAGER)
        else:  # a batch of products, one per ensemble member
            out = torch.stack([product(x, y, x.shape, y.shape, EAGER) for x, y in zip(a, b)])
        return out if bias is None else out + bias


def same_products(fn):
    """fn, run inside SameProducts."""
    def call(*args, **kwargs):
        with SameProducts():
            return fn(*args, **kwargs)
    return call


class CpuMatmuls(CustomGraphPass):
    """Inductor's post-grad pass (torch.compile option post_grad_custom_post_pass): every fp32 mm, bmm, addmm and
    baddbmm on the CPU becomes product()'s plan in graph nodes (transposes, aten.mm, v2a.onednn_mm; a batched product
    one plan per member, stacked), plus the bias for addmm and baddbmm (a sum that inductor fuses into the elementwise
    kernel after it, e.g. the ReLU)."""

    def __call__(self, graph: torch.fx.Graph):
        def node(target, *args):  # a graph node and its meta value (what the compiler reads: shape, strides)
            n = graph.call_function(target, args)
            n.meta["val"] = target(*torch.fx.node.map_arg(args, lambda a: a.meta["val"]))
            return n

        # in ops that inductor lowers as they are (it decomposes t and stack before this pass, and not after it)
        ops = SimpleNamespace(t=lambda x: node(aten.permute.default, x, [1, 0]), mm=lambda a, b: node(aten.mm.default, a, b),
                              onednn=lambda a, b: node(torch.ops.v2a.onednn_mm.default, a, b))
        for n in list(graph.nodes):
            operands = n.op == "call_function" and _operands(n.target, n.args, n.kwargs, lambda x: x.meta["val"])
            if not operands:
                continue
            bias, a, b = operands
            with graph.inserting_before(n):
                shape_a, shape_b = a.meta["val"].shape, b.meta["val"].shape
                if len(shape_a) == 2:
                    out = product(a, b, shape_a, shape_b, ops)
                else:
                    members = [product(node(aten.select.int, a, 0, e), node(aten.select.int, b, 0, e), shape_a[1:],
                                       shape_b[1:], ops) for e in range(shape_a[0])]
                    out = node(aten.cat.default, [node(aten.unsqueeze.default, m, 0) for m in members])
                out = out if bias is None else node(aten.add.Tensor, out, bias)
            n.replace_all_uses_with(out)
            graph.erase_node(n)

    def uuid(self) -> bytes:  # inductor's cache key for the pass: this file's text
        return get_hash_for_files((__file__,))
