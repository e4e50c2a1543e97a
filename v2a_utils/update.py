# The pieces of the stages' updates that are not the method: the plain eager step of stages 1-4 (optimize), the
# stage-5 update compiled whole (compiled, with grad_and_value and adam_step_ in place of backward() and opt.step(),
# which would break its graph), and stage 1's GRU recurrence, faster on a CPU than ATen's packed one. Each computes
# what its plain PyTorch form computes, to float rounding (tests/test_v2a.py). docs: docs/speed.md
import warnings
from typing import Callable, Optional

import torch
import torch._dynamo
import torch._inductor.config
import torch.nn as nn

from v2a_utils.matmul import CpuMatmuls, same_products


def optimize(opt, loss: torch.Tensor, params: Optional[list] = None, clip=None) -> torch.Tensor:
    """zero_grad -> backward into `params` only (all leaves if None) -> optional grad-norm clip -> step. `opt` may be
    a list of optimizers whose losses were summed into `loss` (exact when the losses share no parameter)."""
    opts = opt if isinstance(opt, list) else [opt]
    for o in opts:
        o.zero_grad()
    loss.backward(inputs=params)
    if clip is not None:
        nn.utils.clip_grad_norm_(params, clip)
    for o in opts:
        o.step()
    return loss.detach()


def compiled(fn, args, dev: torch.device, opts: tuple = (), static: tuple = ()):
    """`fn` compiled by torch.compile when --compile. For stage 5, `fn` is the whole update (batch draw, forward,
    gradients by grad_and_value, Adam steps by adam_step_, target update), so inductor fuses its elementwise work around
    the matmuls and one compiled call replaces some hundred Python-level operator calls. On CUDA, mode
    reduce-overhead replays it as a CUDA graph; the tensors that it updates in place beyond the modules' parameters
    (the state of `opts`, read at the first call, after a checkpoint has been loaded, and `static`) are marked
    static there, so that the graph can be captured. Compiled code draws the same random numbers as eager code
    (fallback_random). fullgraph: a graph break raises instead of silently running part of the update eagerly (a
    non-tensor aux in grad_and_value once made TD3+BC's actor steps fall back to eager, 30 % slower). On a CPU each
    matrix product of the graph runs on the faster of oneDNN's and ATen's kernels (CpuMatmuls), and --no-compile runs
    `fn` inside SameProducts, which computes the same products alike: both modes give the same numbers."""
    if not args.compile:
        return same_products(fn) if dev.type == "cpu" else fn
    torch._inductor.config.fallback_random = True
    if dev.type == "cuda" and tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 13):
        # torch 2.11's inductor asserts in its loop reordering (reorder_loops_by_dep_pair) on this update on CUDA, seen on
        # an H100; 2.13, the pinned version, declines the reordering there instead. Off, the update compiles (docs/speed.md)
        torch._inductor.config.loop_ordering_after_fusion = False
    if dev.type == "cuda":
        fn_c = torch.compile(fn, dynamic=False, fullgraph=True, mode="reduce-overhead")
    else:  # each matrix product by its faster kernel (v2a_utils/matmul.py); the code that launches the kernels in C++,
        # not Python: about 4 % of a step on one core now that the products take less of it (docs/speed.md)
        fn_c = torch.compile(fn, dynamic=False, fullgraph=True,
                             options={"post_grad_custom_post_pass": CpuMatmuls(), "cpp_wrapper": True})
    marked = []

    def call(*a, **kw):
        if dev.type == "cuda" and not marked:
            for t in [t for o in opts for st in o.state.values() for t in st.values()] + list(static):
                torch._dynamo.mark_static_address(t)
            marked.append(True)
        try:
            return fn_c(*a, **kw)
        except torch._dynamo.exc.Unsupported as e:  # a fork's change that dynamo cannot trace into the one graph
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RuntimeError(f"the stage-5 update no longer compiles as one graph (--compile uses fullgraph=True): "
                               f"{first}. Run with --no-compile, or find the break with TORCH_LOGS=graph_breaks") from e
        except torch._dynamo.exc.BackendCompilerFailed as e:  # a compiler bug: nothing of the update has run yet
            first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise RuntimeError(f"torch {torch.__version__} failed to compile the stage-5 update ({first}). The earlier "
                               "stages are saved: run the same command again with --resume runs/<this run> --no-compile (the "
                               "same results, slower)") from e

    return call


def params(net: nn.Module) -> dict:
    """`net`'s parameters by name: the form in which torch.func.functional_call and torch.func.grad take them."""
    return dict(net.named_parameters())


def grad_and_value(loss_fn: Callable, params, *args):
    """(gradients of loss_fn(params, *args)'s loss with respect to `params`, in its form (a dict of parameters, or a
    tuple of them), (loss, aux)); loss_fn returns (loss, aux). Inside torch.compile: torch.func.grad_and_value, which
    dynamo traces into the update's graph (torch.autograd.grad would break it). Eager: torch.autograd.grad, which
    runs there at twice the rate of torch.func's transforms. Both give the same gradients (tests/test_v2a.py)."""
    if torch.compiler.is_compiling():
        return torch.func.grad_and_value(loss_fn, has_aux=True)(params, *args)
    groups = params if isinstance(params, tuple) else (params,)
    with torch.enable_grad():
        loss, aux = loss_fn(params, *args)
        grads = iter(torch.autograd.grad(loss, [p for g in groups for p in g.values()]))
    by_name = tuple({k: next(grads) for k in g} for g in groups)
    return (by_name if isinstance(params, tuple) else by_name[0]), (loss.detach(), aux)


def init_adam_state(opt: torch.optim.Adam) -> torch.optim.Adam:
    """Create the state that torch.optim.Adam creates at its first step (step counter, first and second moments), so
    that adam_step_ can run inside a compiled function from the first step; load_state_dict replaces it as usual."""
    for p in opt.param_groups[0]["params"]:
        opt.state[p] = {"step": torch.zeros((), device=p.device), "exp_avg": torch.zeros_like(p),
                        "exp_avg_sq": torch.zeros_like(p)}
    return opt


def cosine_lr(opt: torch.optim.Adam, steps: int) -> torch.optim.lr_scheduler.CosineAnnealingLR:
    """The learning rate of `opt` cosine-annealed to 0 over `steps` scheduler steps (IQL's actor). adam_step_ takes
    the place of opt.step(), which the scheduler expects to see called before its first step: that warning is moot."""
    warnings.filterwarnings("ignore", message=r"Detected call of `lr_scheduler.step\(\)` before `optimizer.step\(\)`")
    return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)


@torch.no_grad()
def adam_step_(opt: torch.optim.Adam, grads: dict):
    """torch.optim.Adam's update (no weight decay, no amsgrad; lr may be a tensor) of `opt`'s parameters with `grads`
    (a dict in their order, as torch.func.grad returns it), written with foreach ops: it compiles into the surrounding
    update, where opt.step() would break the graph. It reads and writes Adam's own state (init_adam_state), so
    state_dict, lr schedulers and checkpoints work unchanged; the arithmetic is fused Adam's up to float rounding."""
    group, g = opt.param_groups[0], list(grads.values())
    (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
    state = [opt.state[p] for p in group["params"]]
    steps, exp_avg, exp_avg_sq = ([st[k] for st in state] for k in ("step", "exp_avg", "exp_avg_sq"))
    torch._foreach_add_(steps, 1)
    torch._foreach_lerp_(exp_avg, g, 1 - beta1)
    torch._foreach_mul_(exp_avg_sq, beta2)
    torch._foreach_addcmul_(exp_avg_sq, g, g, value=1 - beta2)
    # every parameter's counter has the same value; the bias corrections in float64 as fused Adam computes them (in
    # float32, 1 - 0.999^t loses five digits to cancellation)
    step = steps[0].double()
    bias_correction1, bias_correction2_sqrt = 1 - beta1**step, (1 - beta2**step).sqrt()
    denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sq), bias_correction2_sqrt), eps)
    update = torch._foreach_div(exp_avg, denom)
    torch._foreach_mul_(update, lr / bias_correction1)
    torch._foreach_sub_(group["params"], update)


def gru_last_state(gru: nn.GRU, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The state of a one-layer batch-first `gru` after each sequence's last valid step: x [B, T, in] padded, lengths
    [B] >= 1 -> [B, hidden]. The same numbers as `gru` on a packed sequence, to float rounding (tests/test_v2a.py). On
    CUDA it is that (cuDNN's fused kernel). On a CPU it runs the recurrence itself: ATen's packed GRU takes each step's input
    gates as a slice of one [sum(lengths), 3 hidden] tensor, and its backward writes a zero-filled copy of the whole
    tensor for every step, T copies per call; here the gates are split once (one concatenation in the backward), and
    stage 1's GRU forward and backward run ≈1.4x faster on one thread."""
    if x.is_cuda:
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return gru(packed)[1][0]
    order = torch.argsort(lengths, descending=True, stable=True)  # the sequences still running at step t: a prefix
    lens, xs, hid = lengths[order], x[order], gru.hidden_size
    active = (lens[None, :] > torch.arange(int(lens[0]), device=x.device)[:, None]).sum(1).tolist()  # per step
    steps = torch.cat([xs[:n, t] for t, n in enumerate(active)])  # time-major packed rows
    gates_in = torch.addmm(gru.bias_ih_l0, steps, gru.weight_ih_l0.t()).split(active)
    w_hh_t, h, done = gru.weight_hh_l0.t(), x.new_zeros(len(lens), hid), []
    for gi, n in zip(gates_in, active):
        if n < len(h):  # the sequences that ended at the previous step keep their state
            done.append(h[n:])
            h = h[:n]
        gi_rz, gi_n = gi.split([2 * hid, hid], 1)
        gh_rz, gh_n = torch.addmm(gru.bias_hh_l0, h, w_hh_t).split([2 * hid, hid], 1)
        r, z = torch.sigmoid(gi_rz + gh_rz).chunk(2, 1)  # reset and update gates
        cand = torch.tanh(gi_n + r * gh_n)
        h = cand + z * (h - cand)  # (1 - z) cand + z h, in the order ATen computes it
    done.append(h)
    return torch.cat(done[::-1])[torch.argsort(order)]
